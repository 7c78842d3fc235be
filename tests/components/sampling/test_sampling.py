"""The torch-free sampling core: one formula, the same numbers on numpy arrays and torch tensors."""
import numpy as np
import pytest
import torch

from components.errors import ModelError
from components.sampling import array_module
from components.sampling import diffusion as sd
from components.sampling import masked as sm
from components.sampling.requests import FLAGS, PARAMS, SamplingRequestError


def both(a: np.ndarray):
    return a, torch.from_numpy(a.copy())


def test_array_module_names_the_library_that_made_the_array():
    assert array_module(np.zeros(2)) is np and array_module(torch.zeros(2)) is torch


@pytest.mark.parametrize("clip", [True, False])
def test_diffusion_steps_give_the_same_bits_on_numpy_and_torch(clip):
    rng = np.random.default_rng(0)
    x, tx = both(rng.standard_normal((3, 1, 4, 4)))
    e, te = both(rng.standard_normal((3, 1, 4, 4)))
    n, tn = both(rng.standard_normal((3, 1, 4, 4)))
    for step in (lambda x, e, n: sd.ddim_step(x, e, 0.3, 0.6, 0.5, n, clip),
                 lambda x, e, n: sd.ddpm_step(x, e, 0.3, 0.6, n, clip),
                 lambda x, e, n: sd.guided_eps(x, e, 2.5)):
        assert np.array_equal(step(x, e, n), step(tx, te, tn).numpy())


def test_the_sampling_loop_is_the_same_on_numpy_and_torch():
    abar = sd.make_alphas_cumprod(20, "cosine")
    timesteps = sd.sampling_timesteps(20, 6)
    calls = []

    def denoise(x, t, y):
        calls.append(x.shape[0])
        return 0.3 * x + 0.01 * (x * t[:, None, None, None]) - 0.1 * (x * y[:, None, None, None])

    out = {}
    for name, xp in (("numpy", np), ("torch", torch)):
        rng = np.random.default_rng(1)
        y = xp.asarray(np.array([0, 2]))
        def randn(shape, xp=xp, rng=rng):   # one rng per run
            return xp.asarray(rng.standard_normal(shape))
        x = sd.sample_loop(randn((2, 1, 3, 3)), lambda x, t: sd.guided_noise(denoise, x, t, y, 3, 2.0), randn,
                           timesteps, abar, "ddpm")
        out[name] = np.asarray(x)
    assert np.array_equal(out["numpy"], out["torch"])
    assert calls == [4] * 12  # cond + uncond in one call per step, 6 steps, twice


def test_token_draws_give_the_same_ids_on_numpy_and_torch():
    rng = np.random.default_rng(2)
    logits, u = rng.standard_normal((4, 6, 9)).astype(np.float32), rng.random((4, 6))
    for temperature, top_k in ((1.0, 0), (0.7, 3), (2.0, 1)):
        ids = sm.draw_tokens(logits, u, temperature, top_k)
        tids = sm.draw_tokens(torch.from_numpy(logits), torch.from_numpy(u), temperature, top_k)
        assert ids.dtype == np.int64 and tids.dtype == torch.int64 and np.array_equal(ids, tids.numpy())
        if top_k:
            keep = np.argsort(-logits, axis=-1)[..., :top_k]
            assert (ids[..., None] == keep).any(-1).all()  # only the top k are ever drawn


def test_kth_largest_counts_ties_like_topk():
    z = np.array([[1.0, 3.0, 3.0, 2.0]])
    assert sm.kth_largest(z, 2)[0, 0] == 3.0 and sm.kth_largest(torch.from_numpy(z), 3).item() == 2.0


@pytest.mark.parametrize("names, flag", [(PARAMS, "sample.steps"), (FLAGS, "--steps")])
def test_a_refused_request_names_the_setting_as_the_user_wrote_it(names, flag):
    with pytest.raises(sd.DiffusionInputError, match=f"^{flag}: 30 sampling steps asked for"):
        sd.check_request(np.array([0]), 2, 20, 30, "ddim", 0.0, 1.0, names)
    with pytest.raises(sm.MaskedDiffusionError, match=f"^{flag}: K, the number of denoising steps"):
        sm.check_request(0, 4, 0, 1.0, 0, 10, None, names)


@pytest.mark.parametrize("call, pattern", [
    (lambda: sd.check_request(np.array([0]), 2, 20, 5, "euler", 0.0, 1.0), r"^sample.sampler: expected"),
    (lambda: sd.check_request(np.array([0]), 2, 20, 5, "ddim", float("nan"), 1.0), r"^sample.eta: must be >= 0"),
    (lambda: sd.check_request(np.array([0]), 2, 20, 5, "ddim", 0.0, float("inf")), r"^sample.guidance: must be"),
    (lambda: sd.check_request(np.array([], dtype=np.int64), 2, 20, 5, "ddim", 0.0, 1.0), r"^labels: nothing to"),
    (lambda: sm.check_request(0, 4, 2, 0.0, 0, 10), r"^sample.temperature: must be > 0"),
    (lambda: sm.check_request(0, 4, 2, 1.0, 11, 10), r"^sample.top_k: must be between 0 \(off\) and the vocab"),
    (lambda: sm.check_request(0, 0, 2, 1.0, 0, 10), r"^sample.length: must be at least 1 token"),
    (lambda: sm.check_request(3, 14, 2, 1.0, 0, 10, 16), r"^sample.length: the prompt \(3\) plus 14 tokens"),
])
def test_bad_requests_are_one_line_model_errors(call, pattern):
    with pytest.raises(SamplingRequestError, match=pattern) as e:
        call()
    assert isinstance(e.value, ModelError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)
