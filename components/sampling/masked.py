"""Masked (absorbing-state) diffusion sampling without torch: the unmasking schedule, token draws, checks.

Sampling in K steps: the masked share goes from 1 to 0 on the grid t_k = k/K; from t to
s = t - 1/K, the expected share (t - s)/t of the still-masked positions is unmasked, at
positions drawn uniformly among them, each with a token drawn from the model's distribution.
components/models/mdlm.py (torch) and components/inference/ (onnxruntime) both use these; they
draw their randomness from ``rand(shape) -> float64 in [0, 1)`` in the same order, so they give
the same tokens from the same draws.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from components.sampling import array_module
from components.sampling.requests import PARAMS, SamplingRequestError, check_length, check_temperature, check_top_k


class MaskedDiffusionError(SamplingRequestError):
    """A masked-diffusion setting (masked.eps, sample.steps, a length) is out of range; one line."""


def check_steps(steps: int, names: Mapping[str, str] = PARAMS) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise MaskedDiffusionError(f"{names['steps']}: K, the number of denoising steps, must be an integer >= 1, "
                                   f"got {steps!r}")
    return int(steps)


def check_request(prompt_len: int, length: int, steps: int, temperature: float, top_k: int, vocab_size: int,
                  block_size: Optional[int] = None, names: Mapping[str, str] = PARAMS) -> None:
    """Refuse a bad request before any network call; vocab_size: the ids a draw picks from (no [MASK])."""
    check_steps(steps, names)
    check_temperature(temperature, names)
    check_top_k(top_k, vocab_size, names)
    check_length(length, names)
    if block_size is not None and prompt_len + length > block_size:
        raise MaskedDiffusionError(f"{names['length']}: the prompt ({prompt_len}) plus {length} tokens exceed the "
                                   f"model's block_size={block_size}; a masked model writes the whole sequence at once")


def unmask_counts(length: int, steps: int) -> list[int]:
    """How many positions each of the K steps unmasks (sums to `length`; the last step empties the mask).

    With n_k = floor(length * k / K) positions still masked at t_k = k/K, step k (from t_k to
    t_{k-1}) unmasks n_k - n_{k-1}: the expected share (t - s)/t of the masked ones, made whole.
    """
    check_steps(steps)
    return [length * k // steps - length * (k - 1) // steps for k in range(steps, 0, -1)]


def kth_largest(z, k: int):
    """(..., V) -> (..., 1): each row's k-th largest value (ties counted, as torch.topk does)."""
    index = z.argsort(-1)[..., -k:][..., :1]                                   # (..., 1)
    return z.gather(-1, index) if array_module(z) is not np else np.take_along_axis(z, index, -1)


def draw_tokens(logits, u, temperature: float = 1.0, top_k: int = 0):
    """Inverse-CDF draws: logits (..., V), u (...) float64 uniform in [0, 1) -> int64 ids (...).

    Float64 maths whatever the logits' dtype; numpy arrays or torch tensors alike.
    """
    xp = array_module(logits)
    z = xp.asarray(logits, dtype=xp.float64) / temperature
    if top_k:
        z = xp.where(z < kth_largest(z, top_k), -math.inf, z)
    cdf = xp.cumsum(xp.exp(z - xp.amax(z, axis=-1, keepdims=True)), axis=-1)  # (..., V) unnormalised
    ids = (cdf < u[..., None] * cdf[..., -1:]).sum(-1)
    return ids.clip(max=z.shape[-1] - 1)
