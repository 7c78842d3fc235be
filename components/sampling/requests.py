"""Checks every sampler shares: one line naming the setting as the user wrote it.

The PyTorch processes name a setting by its params.yaml key (``sample.steps``), the
onnxruntime engines by the option of `genflow sample` (``--steps``): pass ``names=PARAMS``
or ``names=FLAGS``.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

from components.errors import ModelError

PARAMS = {"steps": "sample.steps", "sampler": "sample.sampler", "eta": "sample.eta",
          "guidance": "sample.guidance", "label": "class label", "count": "labels",
          "temperature": "sample.temperature", "top_k": "sample.top_k", "length": "sample.length",
          "prompt": "prompt", "jump": "jump_length", "resample": "jump_n_sample", "image": "image",
          "mask": "mask"}
FLAGS = {"steps": "--steps", "sampler": "sampler", "eta": "eta", "guidance": "--guidance", "label": "--label",
         "count": "count", "temperature": "--temperature", "top_k": "--top-k", "length": "--length",
         "prompt": "--prompt", "jump": "--jump", "resample": "--resample", "image": "--inpaint", "mask": "--mask"}


class SamplingRequestError(ModelError):
    """A sampling request out of range (steps, sampler, eta, guidance, labels, temperature, top-k, length)."""


def check_labels(labels, num_classes: int, names: Mapping[str, str] = PARAMS, model: str = "this model") -> None:
    """Refuse an empty batch or a class id outside 0..num_classes-1; labels: numpy array or tensor."""
    values = labels.reshape(-1).tolist()
    if not values:
        raise SamplingRequestError(f"{names['count']}: nothing to sample; ask for at least one image")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise SamplingRequestError(f"{names['label']}: {model} knows classes 0..{num_classes - 1}, got {bad[0]}")


def check_temperature(temperature: float, names: Mapping[str, str] = PARAMS) -> float:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SamplingRequestError(f"{names['temperature']}: must be > 0 (1.0 samples the model as trained), "
                                   f"got {temperature}")
    return float(temperature)


def check_top_k(top_k: int, choices: int, names: Mapping[str, str] = PARAMS, what: Optional[str] = None) -> int:
    """0 (off) .. `choices`, the number of tokens a draw picks from (`what` names them)."""
    if not 0 <= top_k <= choices:
        what = what or f"the vocabulary size {choices}"
        raise SamplingRequestError(f"{names['top_k']}: must be between 0 (off) and {what}, got {top_k}")
    return int(top_k)


def check_length(length: int, names: Mapping[str, str] = PARAMS) -> int:
    if length < 1:
        raise SamplingRequestError(f"{names['length']}: must be at least 1 token, got {length}")
    return int(length)
