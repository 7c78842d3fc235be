"""Gaussian diffusion: the noise schedule, the training loss and the DDPM/DDIM samplers.

The process is separate from the network (diffusers' way): anything with the call
signature ``denoise(x, t, y) -> eps`` can be trained and sampled here, a U-Net, a DiT or an
ONNX session wrapped in a function.

Conventions (Ho et al. 2020; Song et al. 2021 for DDIM; Ho & Salimans 2022 for guidance):
  timesteps t = 0..T-1, ``alphas_cumprod[t]`` = abar_t, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
  images live in [-1, 1]; the null (unconditional) class id is ``num_classes``.

The schedules, the per-step maths (DDPM/DDIM steps, guidance, timestep spacing), the request
checks and the denoising loop live in components/sampling/diffusion.py, torch-free, shared with
the onnxruntime engines; this module adds what needs torch: the forward process and the loss.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from components.config import DiffusionConfig  # noqa: F401  (re-exported: the process's settings)
from components.errors import ConfigError
from components.sampling.diffusion import (  # noqa: F401  (re-exported)
    DiffusionInputError,
    check_request,
    guided_noise,
    inpaint_loop,
    make_alphas_cumprod,
    repaint_schedule,
    sample_loop,
)

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, y) -> eps


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
            raise ConfigError(f"diffusion.p_uncond: must be in [0, 1), got {p_uncond}")
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
        return check_request(y, self.num_classes, self.timesteps, steps, sampler, eta, guidance)

    def eps(self, denoise: Denoise, x: torch.Tensor, t: int, y: torch.Tensor, guidance: float) -> torch.Tensor:
        """Network noise prediction at one timestep, with classifier-free guidance."""
        return guided_noise(denoise, x, t, y, self.null_class, guidance)

    @torch.no_grad()
    def sample(self, denoise: Denoise, y: torch.Tensor, shape: tuple[int, ...], *, sampler: str = "ddim",
               steps: int = 50, eta: float = 0.0, guidance: float = 1.0,
               generator: Optional[torch.Generator] = None, clip: bool = True) -> torch.Tensor:
        """Draw len(y) images of `shape` (C, H, W) for labels y; returns (B, C, H, W) in [-1, 1]."""
        y = torch.as_tensor(y, dtype=torch.long)
        timesteps = self.check_request(y, steps, guidance, sampler, eta)

        def randn(shape: tuple) -> torch.Tensor:
            return torch.randn(shape, generator=generator)

        x = randn((len(y), *shape))                                            # x_T ~ N(0, I)
        return sample_loop(x, lambda x, t: self.eps(denoise, x, t, y, guidance), randn, timesteps,
                           self.alphas_cumprod, sampler, eta, clip)

    @torch.no_grad()
    def inpaint(self, denoise: Denoise, known: torch.Tensor, keep: torch.Tensor, y: Optional[torch.Tensor] = None,
                *, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, guidance: float = 1.0,
                jump_length: int = 1, jump_n_sample: int = 1, generator: Optional[torch.Generator] = None,
                clip: bool = True) -> torch.Tensor:
        """Complete known (B, C, H, W) in [-1, 1] where keep (bool, same shape) is False (RePaint).

        y: a class per image (guided by `guidance`); None: unconditional (the null class alone).
        The same loop as the onnxruntime engines' inpaint (components/sampling/diffusion.py).
        """
        if y is None:
            y, guidance = torch.zeros(len(known), dtype=torch.long), 0.0
        y = torch.as_tensor(y, dtype=torch.long)
        timesteps = self.check_request(y, steps, guidance, sampler, eta)
        repaint_schedule(len(timesteps), jump_length, jump_n_sample)

        def randn(shape: tuple) -> torch.Tensor:
            return torch.randn(shape, generator=generator)

        return inpaint_loop(randn(tuple(known.shape)), known, keep, lambda x, t: self.eps(denoise, x, t, y, guidance),
                            randn, timesteps, self.alphas_cumprod, sampler, eta, clip, jump_length, jump_n_sample)

    @torch.no_grad()
    def class_scores(self, denoise: Denoise, x0: torch.Tensor, weight: torch.Tensor, timesteps: list[int],
                     draws: int = 2, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, num_classes) mean weighted noise-prediction error of x0 (B, C, H, W) under each class: lower =
        the class explains x0 better (a diffusion classifier, Li et al. 2023). weight (B, C, H, W) in [0, 1]
        picks the pixels that count (e.g. the known ones); every class sees the same noise draws."""
        B, K = len(x0), self.num_classes
        scores = torch.zeros(B, K)
        for t in timesteps:
            for _ in range(draws):
                noise = torch.randn(x0.shape, generator=generator)
                xt = self.add_noise(x0, noise, torch.full((B,), t, dtype=torch.long))
                y = torch.arange(K).repeat_interleave(B)                                  # (K*B,) class-major
                eps = denoise(xt.repeat(K, 1, 1, 1), torch.full((K * B,), t, dtype=torch.long), y)
                err = ((eps.view(K, B, *x0.shape[1:]) - noise[None]) ** 2 * weight[None]).sum((2, 3, 4))  # (K, B)
                scores += err.T
        return scores / (len(timesteps) * draws)
