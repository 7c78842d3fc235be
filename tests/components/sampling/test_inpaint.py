"""RePaint inpainting maths: the jump schedule, the known-pixel constraint, mask checks (numpy, no network)."""
import numpy as np
import pytest

from components.errors import GenflowError
from components.sampling import diffusion as sd
from components.sampling.requests import FLAGS

ABAR = sd.make_alphas_cumprod(20, "cosine")


def denoiser(x, t):
    """A fixed smooth noise predictor (a stand-in network): deterministic in x and t."""
    return 0.3 * np.tanh(x) + 0.01 * t


def image_and_mask(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    known = rng.uniform(-1, 1, (batch, 1, 8, 8)).astype(np.float32)
    keep = np.ones_like(known, dtype=bool)
    keep[:, :, 2:6, 1:5] = False                                 # a square to fill
    return known, keep


def test_without_resampling_the_schedule_is_the_plain_chain():
    assert sd.repaint_schedule(5) == [5, 4, 3, 2, 1, 0]
    assert sd.repaint_schedule(5, jump_length=3, jump_n_sample=1) == [5, 4, 3, 2, 1, 0]


def test_jumps_go_back_up_jump_length_positions_jump_n_sample_minus_one_times():
    path = sd.repaint_schedule(10, jump_length=3, jump_n_sample=3)
    assert path[0] == 10 and path[-1] == 0
    assert all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    assert min(path) == 0 and path.count(0) == 1                # x_0 is reached once, at the end
    # jump points 7, 4, 1: the chain turns up there jump_n_sample - 1 times each, nowhere else
    turns = [b for a, b, c in zip(path, path[1:], path[2:]) if a > b < c]
    assert turns == [7, 7, 4, 4, 1, 1]
    ups = sum(1 for a, b in zip(path, path[1:]) if b > a)
    assert ups == 3 * 2 * 3                                      # 3 jump points x 2 repeats x 3 positions
    assert path[:8] == [10, 9, 8, 7, 8, 9, 10, 9]


@pytest.mark.parametrize("kw, pattern", [
    (dict(jump_length=0), r"^--jump: must be at least 1, got 0$"),
    (dict(jump_n_sample=0), r"^--resample: must be at least 1 \(1: no resampling\), got 0$"),
    (dict(jump_length=5, jump_n_sample=2), r"^--jump: 5 must be below the 5 sampling steps"),
])
def test_bad_resampling_settings_are_one_line(kw, pattern):
    with pytest.raises(sd.InpaintInputError, match=pattern):
        sd.repaint_schedule(5, names=FLAGS, **kw)


@pytest.mark.parametrize("sampler, steps, eta, jump, resample", [
    ("ddim", 10, 0.0, 1, 1), ("ddim", 10, 1.0, 3, 3), ("ddpm", 20, 0.0, 1, 1), ("ddpm", 20, 0.0, 4, 2),
    ("ddpm", 7, 0.0, 2, 3)])
def test_known_pixels_equal_the_input_at_the_last_step(sampler, steps, eta, jump, resample):
    known, keep = image_and_mask()
    rng = np.random.default_rng(1)
    draws = []

    def randn(shape):
        draws.append(shape)
        return rng.standard_normal(shape, dtype=np.float32)

    timesteps = sd.sampling_timesteps(20, steps)
    x = sd.inpaint_loop(randn(known.shape), known, keep, denoiser, randn, timesteps, ABAR, sampler, eta,
                        jump_length=jump, jump_n_sample=resample)
    assert x.shape == known.shape and np.isfinite(x).all()
    assert np.array_equal(x[keep], known[keep])                 # bit for bit
    assert np.abs(x[~keep] - known[~keep]).min() > 0            # the hole was generated, not copied
    assert x[~keep].min() >= -1 and x[~keep].max() <= 1
    path = sd.repaint_schedule(len(timesteps), jump, resample)
    ups = sum(1 for a, b in zip(path, path[1:]) if b > a)
    downs = len(path) - 1 - ups
    stochastic = sampler == "ddpm" or eta > 0
    # x_T + its known pixels, then per step down: the step's noise and the known pixels' noise
    # (neither on the last step), per step up: one re-noising draw
    assert len(draws) == 2 + (downs - 1) * (1 + stochastic) + ups


def test_the_generated_region_depends_on_the_known_pixels():
    known, keep = image_and_mask(batch=1)
    timesteps = sd.sampling_timesteps(20, 10)

    def mixing(x, t):  # the hole sees the known pixels only through a network that mixes pixels
        return 0.5 * x - 0.4 * x.mean(axis=(2, 3), keepdims=True)

    def run(image):
        rng = np.random.default_rng(5)
        randn = lambda shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
        return sd.inpaint_loop(randn(image.shape), image, keep, mixing, randn, timesteps, ABAR)

    a, b = run(known), run(-known)
    assert not np.allclose(a[~keep], b[~keep])


def test_the_loop_runs_on_torch_tensors_too():
    torch = pytest.importorskip("torch")
    known, keep = image_and_mask(batch=2)
    timesteps = sd.sampling_timesteps(20, 5)
    draws = np.random.default_rng(2).standard_normal((64, *known.shape), dtype=np.float32)

    def randn_np():
        it = iter(draws)
        return lambda shape: next(it)

    def randn_t():
        it = iter(torch.from_numpy(draws))
        return lambda shape: next(it)

    r = randn_np()
    a = sd.inpaint_loop(r(known.shape), known, keep, denoiser, r, timesteps, ABAR, "ddpm",
                        jump_length=2, jump_n_sample=2)
    r = randn_t()
    b = sd.inpaint_loop(r(known.shape), torch.from_numpy(known), torch.from_numpy(keep),
                        lambda x, t: 0.3 * torch.tanh(x) + 0.01 * t, r, timesteps, ABAR, "ddpm",
                        jump_length=2, jump_n_sample=2)
    np.testing.assert_allclose(a, b.numpy(), atol=1e-5)


def test_a_mask_of_another_shape_or_with_nothing_to_fill_is_refused():
    known, keep = image_and_mask(batch=1)
    with pytest.raises(sd.InpaintInputError, match=r"^--mask: shape \(1, 1, 4, 4\) differs from the image's "
                                                   r"\(1, 1, 8, 8\); give a mask of the image's size$"):
        sd.check_inpaint(known.shape, keep[:, :, :4, :4], FLAGS)
    with pytest.raises(GenflowError, match=r"^--mask: nothing to fill \(all black"):
        sd.check_inpaint(known.shape, np.ones_like(keep), FLAGS)
    sd.check_inpaint(known.shape, keep, FLAGS)
    sd.check_inpaint(known.shape, np.zeros_like(keep), FLAGS)   # all white: regenerate everything
