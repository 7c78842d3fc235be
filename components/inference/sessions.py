"""onnxruntime sessions: the provider that really works, all cores, no spinning."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

from components.errors import ModelError


class InferenceError(ModelError):
    """An exported model, or a request of `genflow sample`, that cannot be used; the message is one line."""


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: Optional[int] = None) -> Any:
    """intra-op threads = cores, no spinning (it stalls shared machines), all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cpu_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: the CUDA fallback's warnings are reported by us instead
    return so


def make_session(path: Path, threads: Optional[int] = None, prefer_gpu: bool = True) -> tuple[Any, str]:
    """An InferenceSession on the best provider that actually works; returns (session, provider).

    CUDAExecutionProvider when onnxruntime lists it and the session really gets it (a CUDA build
    without CUDA libraries lists it but falls back), CPUExecutionProvider otherwise.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: missing; export the model again (genflow stage export <model>)")
    providers = ["CPUExecutionProvider"]
    if prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        with warnings.catch_warnings():  # a listed-but-unusable CUDA provider warns; we report the outcome
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:  # InvalidProtobuf, InvalidGraph, Fail: all mean the file is unusable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InferenceError(f"{path}: not a usable ONNX model ({first[:200]}); export it again") from None
    return session, session.get_providers()[0]
