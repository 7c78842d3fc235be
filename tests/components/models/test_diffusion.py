"""Gaussian diffusion: schedules, forward noising, loss, DDPM/DDIM steps, guidance and bad input."""
import numpy as np
import pytest
import torch

from components.errors import ConfigError
from components.models.diffusion import GaussianDiffusion, make_alphas_cumprod
from components.sampling.diffusion import ddim_step, ddpm_step, guided_eps, sampling_timesteps
from components.sampling.requests import SamplingRequestError


class Spy:
    """A denoiser that records its calls and returns a fixed function of its input."""

    def __init__(self, fn=None):
        self.calls = []
        self.fn = fn or (lambda x, t, y: 0.1 * x)

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        return self.fn(x, t, y)


def optimal_denoiser(diffusion, target):
    """The exact eps-predictor when the data is the single image `target`."""
    abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float64)

    def denoise(x, t, y):
        a = abar[t].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * target) / (1 - a).sqrt()).float()
    return denoise


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_go_from_data_to_noise(schedule):
    abar = make_alphas_cumprod(200, schedule)
    assert abar.shape == (200,)
    assert np.all(np.diff(abar) < 0)             # strictly more noise at every step
    assert abar[0] > 0.99 and abar[-1] < 0.01    # starts at the data, ends near pure noise


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="^diffusion.schedule: expected 'linear' or 'cosine'"):
        GaussianDiffusion(timesteps=10, schedule="quadratic")


def test_add_noise_matches_closed_form():
    d = GaussianDiffusion(timesteps=50, schedule="cosine", num_classes=3)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 7, 25, 49])
    xt = d.add_noise(x0, noise, t)
    abar = make_alphas_cumprod(50, "cosine")[t.numpy()].reshape(-1, 1, 1, 1)
    expected = np.sqrt(abar) * x0.numpy() + np.sqrt(1 - abar) * noise.numpy()
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_training_loss_is_reproducible_and_drops_labels():
    d = GaussianDiffusion(timesteps=20, num_classes=3, p_uncond=0.5)
    spy = Spy()
    x0, y = torch.zeros(64, 1, 4, 4), torch.zeros(64, dtype=torch.long)
    a = d.training_loss(spy, x0, y, torch.Generator().manual_seed(1))
    b = d.training_loss(spy, x0, y, torch.Generator().manual_seed(1))
    assert a.dim() == 0 and a.item() == b.item()
    labels = spy.calls[0][2]
    assert set(labels.tolist()) == {0, 3}       # kept labels and the null class (= num_classes)
    assert 10 < int((labels == 3).sum()) < 54    # about half dropped with p_uncond = 0.5
    t = spy.calls[0][1]
    assert t.min() >= 0 and t.max() < 20


def test_sampling_timesteps():
    assert sampling_timesteps(10, 10) == list(range(9, -1, -1))
    ts = sampling_timesteps(200, 10)
    assert len(ts) == 10 and ts[0] == 199 and all(a > b for a, b in zip(ts, ts[1:]))


def test_ddpm_step_is_the_textbook_posterior_mean():
    abar = make_alphas_cumprod(100, "linear")
    t = 40
    alpha_t = abar[t] / abar[t - 1]
    x, eps = np.random.default_rng(0).normal(size=(2, 5))
    mean = ddpm_step(x, eps, abar[t], abar[t - 1], noise=np.zeros(5), clip=False)
    # Ho et al.: mu = (x - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)
    expected = (x - (1 - alpha_t) / np.sqrt(1 - abar[t]) * eps) / np.sqrt(alpha_t)
    np.testing.assert_allclose(mean, expected, rtol=1e-10)


def test_ddim_step_with_true_noise_stays_on_the_trajectory():
    rng = np.random.default_rng(0)
    x0, eps = rng.uniform(-1, 1, size=6), rng.normal(size=6)
    abar_t, abar_prev = 0.3, 0.8
    xt = np.sqrt(abar_t) * x0 + np.sqrt(1 - abar_t) * eps
    prev = ddim_step(xt, eps, abar_t, abar_prev, eta=0.0)
    np.testing.assert_allclose(prev, np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev) * eps, rtol=1e-10)
    np.testing.assert_allclose(ddim_step(xt, eps, abar_t, 1.0), x0, rtol=1e-10)  # last step lands on x0


def test_step_functions_agree_on_numpy_and_torch():
    rng = np.random.default_rng(1)
    x, eps, noise = rng.normal(size=(3, 2, 4)).astype(np.float32)
    for step in (lambda a, b, n: ddim_step(a, b, 0.4, 0.7, 0.5, n), lambda a, b, n: ddpm_step(a, b, 0.4, 0.7, n)):
        np_out = step(x, eps, noise)
        torch_out = step(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(noise)).numpy()
        np.testing.assert_allclose(np_out, torch_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 30), ("ddim", 30), ("ddim", 5), ("ddpm", 7)])
def test_samplers_recover_the_data_with_an_exact_denoiser(sampler, steps):
    d = GaussianDiffusion(timesteps=30, num_classes=2)
    target = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    x = d.sample(optimal_denoiser(d, target), torch.tensor([0, 1, 1]), (1, 4, 4), sampler=sampler, steps=steps,
                 guidance=1.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(x.numpy(), 0.5, atol=1e-4)


def test_ddim_eta0_is_deterministic_for_a_seed():
    d = GaussianDiffusion(timesteps=20, num_classes=3)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    denoise = lambda x, t, y: net(x) * (1 + y.view(-1, 1, 1, 1))  # noqa: E731
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        a = d.sample(denoise, y, (1, 4, 4), steps=10, eta=0.0, guidance=2.0, generator=torch.Generator().manual_seed(3))
        b = d.sample(denoise, y, (1, 4, 4), steps=10, eta=0.0, guidance=2.0, generator=torch.Generator().manual_seed(3))
        c = d.sample(denoise, y, (1, 4, 4), steps=10, eta=0.0, guidance=2.0, generator=torch.Generator().manual_seed(4))
        e = d.sample(denoise, y, (1, 4, 4), steps=10, eta=1.0, guidance=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, e)   # eta > 0 injects fresh noise


def test_guidance_batches_conditional_and_null_labels():
    d = GaussianDiffusion(timesteps=10, num_classes=4)
    spy = Spy(lambda x, t, y: torch.where((y == 4).view(-1, 1, 1, 1), torch.zeros_like(x), torch.ones_like(x)))
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([1, 3])
    eps = d.eps(spy, x, 5, y, guidance=3.0)
    size, t, labels = spy.calls[0]
    assert size == 4 and labels.tolist() == [1, 3, 4, 4] and t.tolist() == [5] * 4
    assert torch.allclose(eps, torch.full_like(x, 3.0))  # 0 + 3 * (1 - 0)
    spy.calls.clear()
    d.eps(spy, x, 5, y, guidance=1.0)
    assert spy.calls[0][0] == 2                          # conditional only: no doubled batch
    assert float(guided_eps(2.0, 1.0, 0.0)) == 1.0       # w = 0: unconditional


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 31}, "steps"),
    ({"guidance": -0.5}, "guidance"),
    ({"labels": [0, 4]}, r"^class label: this model knows classes 0\.\.3, got 4$"),
    ({"labels": [-1]}, r"^class label: this model knows classes 0\.\.3, got -1$"),
    ({"sampler": "euler"}, "sampler"),
])
def test_bad_requests_fail_before_sampling(kwargs, match):
    d = GaussianDiffusion(timesteps=30, num_classes=4)
    spy = Spy()
    labels = torch.tensor(kwargs.pop("labels", [0, 1]))
    with pytest.raises(SamplingRequestError, match=match):
        d.sample(spy, labels, (1, 4, 4), **kwargs)
    assert spy.calls == []


def test_unet_diffusion_loss_falls_on_a_tiny_set(tmp_path):
    from components.config import TrainConfig
    from components.models.unet import UNet, UNetConfig
    from components.training import train

    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), image_size=8, num_classes=2)
    d = GaussianDiffusion(timesteps=50, num_classes=2)
    labels = torch.arange(16) % 2
    images = -torch.ones(16, 1, 8, 8)              # class 0: a bright left half; class 1: a bright top half
    images[labels == 0, :, :, :4] = 1
    images[labels == 1, :, :4, :] = 1

    def get_batch(step, gen):
        idx = torch.randint(0, 16, (16,), generator=gen)
        return images[idx], labels[idx]

    cfg = TrainConfig(max_steps=60, max_seconds=0, lr=3e-3, warmup_steps=5, ema_decay=0.0, log_every=20,
                      checkpoint_every=0, threads=1)
    _, result = train(net, get_batch, lambda m, b, g: d.training_loss(m, b[0], b[1], g), cfg, tmp_path,
                      items_per_batch=16)
    assert result.losses[0] > 0.5                    # the zero-initialised net starts near MSE = 1
    assert result.losses[-1] < 0.5 * result.losses[0]


def class_denoiser(diffusion, targets):
    """The exact eps-predictor when class c's data is the single image targets[c] (the null class: targets[0])."""
    abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float64)

    def denoise(x, t, y):
        a = abar[t].view(-1, 1, 1, 1)
        target = targets[torch.clamp(y, max=len(targets) - 1)]
        return ((x.double() - a.sqrt() * target) / (1 - a).sqrt()).float()
    return denoise


def test_class_scores_pick_the_class_whose_predictions_fit_the_weighted_pixels():
    d = GaussianDiffusion(timesteps=30, num_classes=3)
    targets = torch.stack([torch.full((1, 4, 4), v, dtype=torch.float64) for v in (-0.5, 0.0, 0.5)])
    x0 = targets[[2, 0, 1]].float()
    weight = torch.zeros_like(x0)
    weight[..., :2, :] = 1.0                                               # only the top rows count
    scores = d.class_scores(class_denoiser(d, targets), x0, weight, [3, 15, 27],
                            generator=torch.Generator().manual_seed(0))
    assert scores.shape == (3, 3)
    assert scores.argmin(1).tolist() == [2, 0, 1]
    assert scores[0, 2] == pytest.approx(0.0, abs=1e-6)                  # the exact class predicts the noise
    x0[0, :, 2:] = 0.9                                                     # pixels of weight 0 change nothing
    again = d.class_scores(class_denoiser(d, targets), x0, weight, [3, 15, 27],
                           generator=torch.Generator().manual_seed(0))
    assert again[0, 2] == pytest.approx(0.0, abs=1e-6)


def test_inpaint_fills_the_hole_with_the_class_asked_for_and_keeps_the_rest():
    d = GaussianDiffusion(timesteps=30, num_classes=3)
    targets = torch.stack([torch.full((1, 4, 4), v, dtype=torch.float64) for v in (-0.5, 0.0, 0.5)])
    known = torch.full((2, 1, 4, 4), 0.25)
    keep = torch.ones_like(known, dtype=torch.bool)
    keep[..., 2:, :] = False
    x = d.inpaint(class_denoiser(d, targets), known, keep, torch.tensor([2, 1]), steps=30, guidance=1.0,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[keep], known[keep])                               # kept pixels exactly as given
    np.testing.assert_allclose(x[0, :, 2:].numpy(), 0.5, atol=0.05)        # the hole: class 2's image
    np.testing.assert_allclose(x[1, :, 2:].numpy(), 0.0, atol=0.05)
    with pytest.raises(SamplingRequestError):
        d.inpaint(class_denoiser(d, targets), known, keep, torch.tensor([3, 1]))
