"""The sampling maths of every model, without torch: numpy and math only.

Each formula is written once, with arithmetic operators, ``.clip`` and Python-float
coefficients, so it runs unchanged on numpy arrays (the onnxruntime engines in
components/inference/) and on torch tensors (the PyTorch processes in components/models/):

    diffusion.py   noise schedules, timestep spacing, DDPM/DDIM steps, guidance, request checks
    masked.py      the masked-LM unmasking schedule, token draws, request checks
    requests.py    checks every sampler shares (labels, temperature, top-k, length)

Where a formula needs a function rather than an operator (exp, cumsum, concatenate), it
asks `array_module(x)` for numpy or torch, whichever made x.
"""
from __future__ import annotations

import sys
from types import ModuleType

import numpy as np


def array_module(x) -> ModuleType:
    """torch for a torch tensor, numpy otherwise: the module whose functions take x.

    torch is never imported here: a tensor means whoever made it already did.
    """
    return sys.modules["torch"] if type(x).__module__.partition(".")[0] == "torch" else np
