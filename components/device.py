"""Where training runs and in which precision: train.device and train.precision, resolved once.

    placement = resolve(mc.train.device, mc.train.precision, where=f"models.{key}.train")
    placement.device      # torch.device("cuda", 0) or torch.device("cpu")
    placement.precision   # "fp32" | "bf16" | "fp16"

``train.device``: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``. ``train.precision``: ``auto`` (fp32 on the CPU, bf16 on a GPU that supports it, else
fp32), ``fp32``, ``bf16`` or ``fp16`` (GPU only; trained with a gradient scaler). Weights, EMA
and checkpoints stay fp32 whatever the precision: bf16/fp16 only run the forward pass under
autocast. A setting the machine cannot honour is one ConfigError line before anything trains.

`decide` is the pure rule (the machine's facts passed in, so every branch is testable without a
GPU); `resolve` asks torch for the facts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from components.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Placement:
    device_name: str    # "cpu" or "cuda:N"
    precision: str      # "fp32" | "bf16" | "fp16"

    @property
    def device(self) -> Any:
        import torch
        return torch.device(self.device_name)

    @property
    def is_cuda(self) -> bool:
        return self.device_name.startswith("cuda")

    @property
    def autocast_dtype(self) -> Any:
        """The dtype autocast computes in, or None for plain fp32."""
        import torch
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


def decide(device: str, precision: str, *, cuda_available: bool, cuda_count: int,
           bf16_supported: bool, where: str = "train") -> Placement:
    """The placement for the configured device and precision on a machine with these facts."""
    dev = str(device).strip().lower()
    if dev == "auto":
        name = "cuda:0" if cuda_available and cuda_count > 0 else "cpu"
    elif dev == "cpu":
        name = "cpu"
    elif dev == "cuda" or re.fullmatch(r"cuda:\d+", dev):
        index = int(dev.split(":")[1]) if ":" in dev else 0
        if not cuda_available or cuda_count == 0:
            raise ConfigError(f"{where}.device: {device!r}, but torch sees no CUDA GPU on this machine; "
                              "use auto or cpu (or install a CUDA build of torch)")
        if index >= cuda_count:
            raise ConfigError(f"{where}.device: {device!r}, but this machine has {cuda_count} CUDA GPU(s) "
                              f"(cuda:0..cuda:{cuda_count - 1}); use one of those, auto or cpu")
        name = f"cuda:{index}"
    else:
        raise ConfigError(f"{where}.device: {device!r} is not a device; use one of {', '.join(DEVICES)}")

    prec = str(precision).strip().lower()
    on_gpu = name != "cpu"
    if prec == "auto":
        prec = "bf16" if on_gpu and bf16_supported else "fp32"
    elif prec not in PRECISIONS:
        raise ConfigError(f"{where}.precision: {precision!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    elif prec == "fp16" and not on_gpu:
        raise ConfigError(f"{where}.precision: fp16 on the CPU (device {name}); use fp32 or auto, "
                          "or train on a GPU (device: cuda)")
    elif prec == "bf16" and on_gpu and not bf16_supported:
        raise ConfigError(f"{where}.precision: bf16, but {name} does not support bfloat16; use fp16, fp32 or auto")
    elif prec == "bf16" and not on_gpu:
        raise ConfigError(f"{where}.precision: bf16 on the CPU; use fp32 or auto, or train on a GPU (device: cuda)")
    return Placement(device_name=name, precision=prec)


def resolve(device: str = "auto", precision: str = "auto", where: str = "train") -> Placement:
    """decide() with this machine's facts, as torch reports them."""
    import torch

    available = bool(torch.cuda.is_available())
    count = torch.cuda.device_count() if available else 0
    bf16 = False
    if available and count > 0:
        index = int(device.split(":")[1]) if re.fullmatch(r"cuda:\d+", str(device).strip().lower()) else 0
        if index < count:
            with torch.cuda.device(index):
                bf16 = bool(torch.cuda.is_bf16_supported())
    return decide(device, precision, cuda_available=available, cuda_count=count, bf16_supported=bf16, where=where)


def to_device(batch: Any, device: Any, non_blocking: bool = False) -> Any:
    """`batch` (a tensor, or tuples, lists and dicts of them) on `device`; the batch itself on the CPU.

    non_blocking copies are used for pinned CPU tensors only (they are asynchronous only then)."""
    import torch

    if device is None or torch.device(device).type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking and batch.is_pinned())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):   # a named tuple
        return type(batch)(*(to_device(b, device, non_blocking) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def cpu_state(state: Any) -> Any:
    """A state dict (nested dicts/lists of tensors) with every tensor on the CPU, for torch.save."""
    import torch

    if isinstance(state, torch.Tensor):
        return state if state.device.type == "cpu" else state.detach().cpu()
    if isinstance(state, dict):
        out = type(state)((k, cpu_state(v)) for k, v in state.items())
        if hasattr(state, "_metadata"):   # a module's state_dict: keep its version records
            out._metadata = state._metadata
        return out
    if isinstance(state, list):
        return [cpu_state(v) for v in state]
    if isinstance(state, tuple):
        return tuple(cpu_state(v) for v in state)
    return state
