"""Gaussian diffusion without torch: schedules, timestep spacing, DDPM/DDIM steps, guidance, checks.

Conventions (Ho et al. 2020; Song et al. 2021 for DDIM; Ho & Salimans 2022 for guidance):
  timesteps t = 0..T-1, ``alphas_cumprod[t]`` = abar_t, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
  images live in [-1, 1]; the null (unconditional) class id is ``num_classes``.

The steps take x and eps as numpy arrays or torch tensors alike (operators, ``.clip`` and
Python-float coefficients only): components/models/diffusion.py runs them on tensors,
components/inference/ on onnxruntime's arrays, and the two give the same images from the
same noise. `sample_loop` is the denoising loop both run, written out once.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from components.errors import ConfigError
from components.sampling import array_module
from components.sampling.requests import PARAMS, SamplingRequestError, check_labels

SAMPLERS = ("ddpm", "ddim")
SCHEDULES = ("linear", "cosine")


class DiffusionInputError(SamplingRequestError):
    """A sampling request the diffusion process cannot honour (steps, sampler, eta, guidance, labels)."""


# ---------------------------------------------------------------------------
# Noise schedules (float64 numpy)
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
        raise ConfigError(f"diffusion.timesteps: must be at least 1, got {timesteps}")
    if schedule == "linear":
        betas = linear_betas(timesteps)
    elif schedule == "cosine":
        betas = cosine_betas(timesteps)
    else:
        raise ConfigError(f"diffusion.schedule: expected 'linear' or 'cosine', got {schedule!r}")
    return np.cumprod(1.0 - betas)


def sampling_timesteps(timesteps: int, steps: int, names: Mapping[str, str] = PARAMS) -> list[int]:
    """The `steps` timesteps a sampler visits, from T-1 down ("trailing" spacing, ends near 0).

    steps == timesteps gives T-1, T-2, ..., 0 (plain DDPM).
    """
    if not 1 <= steps <= timesteps:
        raise DiffusionInputError(f"{names['steps']}: {steps} sampling steps asked for, but the model was trained "
                                  f"with {timesteps} diffusion timesteps; use 1..{timesteps}")
    ts = np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(np.int64) - 1
    return [int(t) for t in ts]


def check_request(labels, num_classes: int, timesteps: int, steps: int, sampler: str, eta: float,
                  guidance: float, names: Mapping[str, str] = PARAMS, model: str = "this model") -> list[int]:
    """Refuse a bad sampling request before any network call; returns the timesteps to visit."""
    if sampler not in SAMPLERS:
        raise DiffusionInputError(f"{names['sampler']}: expected 'ddpm' or 'ddim', got {sampler!r}")
    if not (guidance >= 0 and math.isfinite(guidance)):
        raise DiffusionInputError(f"{names['guidance']}: must be >= 0 (0: unconditional, 1: conditional only, "
                                  f">1: stronger guidance), got {guidance}")
    if not eta >= 0:
        raise DiffusionInputError(f"{names['eta']}: must be >= 0, got {eta}")
    check_labels(labels, num_classes, names, model)
    return sampling_timesteps(timesteps, steps, names)


# ---------------------------------------------------------------------------
# One sampling step (x, eps, noise: numpy arrays or torch tensors)
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


def guided_noise(denoise: Callable, x, t: int, y, null_class: int, guidance: float):
    """The network's noise prediction at timestep t with classifier-free guidance.

    denoise(x (B,C,H,W), t (B,), y (B,)) -> eps; y holds int64 class ids. The conditional and
    unconditional halves go in one batch: one network call per step.
    """
    xp = array_module(x)
    tt = xp.full_like(y, t)                                                    # (B,) int64
    if guidance == 1.0:
        return denoise(x, tt, y)
    null = xp.full_like(y, null_class)
    if guidance == 0.0:
        return denoise(x, tt, null)
    B = x.shape[0]
    out = denoise(xp.concatenate([x, x]), xp.concatenate([tt, tt]), xp.concatenate([y, null]))
    return guided_eps(out[:B], out[B:], guidance)


# ---------------------------------------------------------------------------
# The denoising loop
# ---------------------------------------------------------------------------

def sample_loop(x, eps: Callable, randn: Callable, timesteps: Sequence[int], alphas_cumprod: np.ndarray,
                sampler: str = "ddim", eta: float = 0.0, clip: bool = True):
    """Denoise x = x_T down `timesteps` (from `sampling_timesteps`); returns x_0 in [-1, 1].

    eps(x, t) -> the noise prediction; randn(shape) -> standard normal noise like x, drawn
    once per stochastic step (after x_T: the order both processes share).
    """
    abar = alphas_cumprod
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        abar_t, abar_prev = float(abar[t]), (float(abar[t_prev]) if t_prev >= 0 else 1.0)
        e = eps(x, t)
        stochastic = t_prev >= 0 and (sampler == "ddpm" or eta > 0)
        noise = randn(x.shape) if stochastic else None
        if sampler == "ddpm":
            x = ddpm_step(x, e, abar_t, abar_prev, noise, clip)
        else:
            x = ddim_step(x, e, abar_t, abar_prev, eta, noise, clip)
    return x


# ---------------------------------------------------------------------------
# Inpainting without retraining (RePaint: Lugmayr et al. 2022)
# ---------------------------------------------------------------------------

class InpaintInputError(DiffusionInputError):
    """An inpainting request that cannot be honoured (image, mask, resampling settings)."""


def check_inpaint(image_shape: Sequence[int], keep, names: Mapping[str, str] = PARAMS) -> None:
    """Refuse a mask of another shape than the image, or one that leaves nothing to fill.

    keep: bool array, True where the image's pixel is kept, False where it is regenerated.
    """
    if tuple(keep.shape) != tuple(image_shape):
        raise InpaintInputError(f"{names['mask']}: shape {tuple(keep.shape)} differs from the image's "
                                f"{tuple(image_shape)}; give a mask of the image's size")
    if bool(keep.all()):
        raise InpaintInputError(f"{names['mask']}: nothing to fill (all black: every pixel is kept); "
                                "paint white where the image should be regenerated")


def repaint_schedule(n_steps: int, jump_length: int = 1, jump_n_sample: int = 1,
                     names: Mapping[str, str] = PARAMS) -> list[int]:
    """The positions an inpainting run visits, from n_steps (x_T) down to 0 (x_0).

    A step down denoises; with jump_n_sample > 1, every jump_length positions the chain goes
    back up jump_length positions by re-noising and denoises again, jump_n_sample - 1 times
    (RePaint's resampling), so the generated region harmonises with the known one.
    jump_n_sample = 1 is plain replacement: n_steps, n_steps - 1, ..., 0.
    """
    if jump_length < 1:
        raise InpaintInputError(f"{names['jump']}: must be at least 1, got {jump_length}")
    if jump_n_sample < 1:
        raise InpaintInputError(f"{names['resample']}: must be at least 1 (1: no resampling), got {jump_n_sample}")
    if jump_n_sample > 1 and jump_length >= n_steps:
        raise InpaintInputError(f"{names['jump']}: {jump_length} must be below the {n_steps} sampling steps "
                                "to jump back within the chain")
    jumps = {p: jump_n_sample - 1 for p in range(n_steps - jump_length, 0, -jump_length)}
    path, p = [n_steps], n_steps
    while p > 0:
        p -= 1
        path.append(p)
        if jumps.get(p, 0) > 0:
            jumps[p] -= 1
            for _ in range(jump_length):
                p += 1
                path.append(p)
    return path


def q_sample(x0, abar_t: float, noise):
    """A draw from q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    return abar_t ** 0.5 * x0 + (1.0 - abar_t) ** 0.5 * noise


def renoise(x, abar_from: float, abar_to: float, noise):
    """A draw from q(x_to | x_from) for abar_to <= abar_from: one jump back up the chain."""
    ratio = abar_to / abar_from
    return ratio ** 0.5 * x + (1.0 - ratio) ** 0.5 * noise


def inpaint_loop(x, known, keep, eps: Callable, randn: Callable, timesteps: Sequence[int],
                 alphas_cumprod: np.ndarray, sampler: str = "ddim", eta: float = 0.0, clip: bool = True,
                 jump_length: int = 1, jump_n_sample: int = 1):
    """`sample_loop` that keeps the known pixels: returns x_0 with x_0[keep] == known[keep] exactly.

    known: the image (B, C, H, W) in [-1, 1]; keep: bool, same shape (True: keep the pixel).
    After every step down to the timestep t, the kept pixels are replaced by a fresh draw of
    q(x_t | known), on the last one by `known` itself; `repaint_schedule` adds the jumps back up.
    randn draws, after x_T: per step down the step's noise (if stochastic), then the known pixels'
    noise (if not the last step); per step up the re-noising draw.
    """
    xp = array_module(x)
    abar, S = alphas_cumprod, len(timesteps)

    def t_at(p: int) -> int:                     # the timestep of position p (0: x_0, no timestep)
        return timesteps[S - p] if p >= 1 else -1

    def abar_at(p: int) -> float:
        return float(abar[t_at(p)]) if p >= 1 else 1.0

    def paste(x, p: int):
        target = known if p == 0 else q_sample(known, abar_at(p), randn(x.shape))
        return xp.where(keep, target, x)

    path = repaint_schedule(S, jump_length, jump_n_sample)
    x = paste(x, path[0])
    for p, q in zip(path, path[1:]):
        if q == p + 1:
            x = renoise(x, abar_at(p), abar_at(q), randn(x.shape))
            continue
        e = eps(x, t_at(p))
        stochastic = q >= 1 and (sampler == "ddpm" or eta > 0)
        noise = randn(x.shape) if stochastic else None
        if sampler == "ddpm":
            x = ddpm_step(x, e, abar_at(p), abar_at(q), noise, clip)
        else:
            x = ddim_step(x, e, abar_at(p), abar_at(q), eta, noise, clip)
        x = paste(x, q)
    return x
