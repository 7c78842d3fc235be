"""Gaussian diffusion: the noise schedule, the training loss and the DDPM/DDIM samplers.

The process is separate from the network (diffusers' way): anything with the call
signature ``denoise(x, t, y) -> eps`` can be trained and sampled here, a U-Net, a DiT or an
ONNX session wrapped in a function. The denoising loop is written out in `sample`.

Conventions (Ho et al. 2020; Song et al. 2021 for DDIM; Ho & Salimans 2022 for guidance):
  timesteps t = 0..T-1, ``alphas_cumprod[t]`` = abar_t, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
  images live in [-1, 1]; the null (unconditional) class id is ``num_classes``.

The per-step maths (`ddpm_step`, `ddim_step`, `guided_eps`, `sampling_timesteps`, the beta
schedules) are small pure functions on plain floats and arrays, written so that they run
unchanged on numpy arrays as well as torch tensors: an inference engine without torch can
reuse them with its own random numbers.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from components.config import DiffusionConfig  # noqa: F401  (re-exported: the process's settings)

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, y) -> eps


class DiffusionInputError(ValueError):
    """A sampling or training request the diffusion process cannot honour (steps, guidance, labels)."""


# ---------------------------------------------------------------------------
# Noise schedules (pure functions, float64 numpy)
# ---------------------------------------------------------------------------

def linear_betas(timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, rescaled so any T ends near pure noise (Nichol & Dhariwal 2021)."""
    scale = 1000.0 / timesteps  # the 1e-4..0.02 range was tuned for T=1000
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    abar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1.0 - abar[1:] / abar[:-1]
    return np.clip(betas, 0.0, max_beta)  # the last beta would be 1: clip keeps x_T finite


def make_alphas_cumprod(timesteps: int, schedule: str) -> np.ndarray:
    """abar_t for t = 0..T-1 (float64)."""
    if timesteps < 1:
        raise DiffusionInputError(f"diffusion.timesteps: must be at least 1, got {timesteps}")
    if schedule == "linear":
        betas = linear_betas(timesteps)
    elif schedule == "cosine":
        betas = cosine_betas(timesteps)
    else:
        raise DiffusionInputError(f"diffusion.schedule: expected 'linear' or 'cosine', got {schedule!r}")
    return np.cumprod(1.0 - betas)


def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """The `steps` timesteps a sampler visits, from T-1 down ("trailing" spacing, ends near 0).

    steps == timesteps gives T-1, T-2, ..., 0 (plain DDPM).
    """
    if not 1 <= steps <= timesteps:
        raise DiffusionInputError(
            f"sample.steps: {steps} sampling steps asked for, but the model was trained with "
            f"diffusion.timesteps={timesteps}; use 1..{timesteps}")
    ts = np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(np.int64) - 1
    return [int(t) for t in ts]


# ---------------------------------------------------------------------------
# One sampling step (pure functions: x and eps may be torch tensors or numpy arrays)
# ---------------------------------------------------------------------------

def predict_x0(x, eps, abar_t: float, clip: bool = True):
    """x_0 implied by x_t and the predicted noise; clipped to the data range [-1, 1]."""
    x0 = (x - (1.0 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    return x0.clip(-1.0, 1.0) if clip else x0


def ddim_step(x, eps, abar_t: float, abar_prev: float, eta: float = 0.0, noise=None, clip: bool = True):
    """DDIM update x_t -> x_prev (Song et al. eq. 12). eta=0: deterministic; eta=1: DDPM-like.

    abar_prev = 1.0 for the final step to x_0. `noise` (same shape as x) is needed when eta > 0.
    """
    x0 = predict_x0(x, eps, abar_t, clip)
    if clip:  # keep eps consistent with the clipped x0 (diffusers does the same)
        eps = (x - abar_t ** 0.5 * x0) / (1.0 - abar_t) ** 0.5
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    x_prev = abar_prev ** 0.5 * x0 + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise DiffusionInputError("ddim_step: eta > 0 needs a noise array")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddpm_step(x, eps, abar_t: float, abar_prev: float, noise=None, clip: bool = True):
    """Ancestral DDPM update x_t -> x_prev: a draw from the posterior q(x_prev | x_t, x_0_hat).

    With abar_prev = abar_{t-1} this is Ho et al.'s sampler; with a coarser grid the step's
    beta is 1 - abar_t / abar_prev (respaced DDPM). `noise` is unused on the final step.
    """
    beta = 1.0 - abar_t / abar_prev
    x0 = predict_x0(x, eps, abar_t, clip)
    # posterior mean: coefficients of x_0 and x_t (Ho et al. eq. 7)
    c0 = abar_prev ** 0.5 * beta / (1 - abar_t)
    ct = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar_t)
    mean = c0 * x0 + ct * x
    var = beta * (1 - abar_prev) / (1 - abar_t)
    if var > 0:
        if noise is None:
            raise DiffusionInputError("ddpm_step: a stochastic step needs a noise array")
        mean = mean + var ** 0.5 * noise
    return mean


def guided_eps(eps_cond, eps_uncond, guidance: float):
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond). w=1: conditional only."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------

class GaussianDiffusion:
    """Noise schedule + loss + samplers for an epsilon-predicting network.

    >>> diffusion = GaussianDiffusion(timesteps=200, schedule="cosine", num_classes=10)
    >>> loss = diffusion.training_loss(net, x0, y, generator)            # train
    >>> x = diffusion.sample(net, y, (1, 8, 8), sampler="ddim", steps=50, guidance=2.0)
    """

    def __init__(self, timesteps: int = 200, schedule: str = "cosine", num_classes: int = 0,
                 p_uncond: float = 0.1):
        if not 0.0 <= p_uncond < 1.0:
            raise DiffusionInputError(f"diffusion.p_uncond: must be in [0, 1), got {p_uncond}")
        self.timesteps = timesteps
        self.schedule = schedule
        self.num_classes = num_classes
        self.p_uncond = p_uncond
        self.alphas_cumprod = make_alphas_cumprod(timesteps, schedule)          # (T,) float64
        self._abar = torch.tensor(self.alphas_cumprod, dtype=torch.float32)    # (T,) for add_noise

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, num_classes: int) -> "GaussianDiffusion":
        return cls(cfg.timesteps, cfg.schedule, num_classes, cfg.p_uncond)

    @property
    def null_class(self) -> int:
        return self.num_classes

    # --- forward process ---------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t of shape (B,)."""
        abar = self._abar.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_loss(self, denoise: Denoise, x0: torch.Tensor, y: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """Epsilon-prediction MSE at uniformly drawn timesteps; labels dropped with p_uncond."""
        B = x0.shape[0]
        t = torch.randint(0, self.timesteps, (B,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        # one null-label model learns p(x) and p(x|y) at once, for classifier-free guidance
        drop = torch.rand(B, generator=generator, device=x0.device) < self.p_uncond
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return F.mse_loss(denoise(self.add_noise(x0, noise, t), t, y), noise)

    # --- reverse process ---------------------------------------------------

    def check_request(self, y: torch.Tensor, steps: int, guidance: float, sampler: str, eta: float) -> list[int]:
        """Refuse a bad sampling request before any network call; returns the timesteps."""
        if sampler not in ("ddpm", "ddim"):
            raise DiffusionInputError(f"sample.sampler: expected 'ddpm' or 'ddim', got {sampler!r}")
        if guidance < 0:
            raise DiffusionInputError(f"sample.guidance: must be >= 0 (0: unconditional, 1: conditional "
                                      f"only, >1: stronger guidance), got {guidance}")
        if eta < 0:
            raise DiffusionInputError(f"sample.eta: must be >= 0, got {eta}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DiffusionInputError(f"class label {bad} is outside this model's classes "
                                      f"0..{self.num_classes - 1}")
        return sampling_timesteps(self.timesteps, steps)

    def eps(self, denoise: Denoise, x: torch.Tensor, t: int, y: torch.Tensor, guidance: float) -> torch.Tensor:
        """Network noise prediction at one timestep, with classifier-free guidance."""
        B = x.shape[0]
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        if guidance == 1.0:
            return denoise(x, tt, y)
        null = torch.full_like(y, self.null_class)
        if guidance == 0.0:
            return denoise(x, tt, null)
        # conditional and unconditional halves in one batch: one network call per step
        out = denoise(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]))
        return guided_eps(out[:B], out[B:], guidance)

    @torch.no_grad()
    def sample(self, denoise: Denoise, y: torch.Tensor, shape: tuple[int, ...], *, sampler: str = "ddim",
               steps: int = 50, eta: float = 0.0, guidance: float = 1.0,
               generator: Optional[torch.Generator] = None, clip: bool = True) -> torch.Tensor:
        """Draw len(y) images of `shape` (C, H, W) for labels y; returns (B, C, H, W) in [-1, 1]."""
        y = torch.as_tensor(y, dtype=torch.long)
        timesteps = self.check_request(y, steps, guidance, sampler, eta)
        abar = self.alphas_cumprod
        x = torch.randn((len(y), *shape), generator=generator)                 # x_T ~ N(0, I)
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            abar_t, abar_prev = float(abar[t]), (float(abar[t_prev]) if t_prev >= 0 else 1.0)
            eps = self.eps(denoise, x, t, y, guidance)
            stochastic = t_prev >= 0 and (sampler == "ddpm" or eta > 0)
            noise = torch.randn(x.shape, generator=generator) if stochastic else None
            if sampler == "ddpm":
                x = ddpm_step(x, eps, abar_t, abar_prev, noise, clip)
            else:
                x = ddim_step(x, eps, abar_t, abar_prev, eta, noise, clip)
        return x
