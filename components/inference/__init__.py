"""Sampling on onnxruntime alone: no PyTorch, directly or through components.models.

An exported model is a folder (``exports/<key>/``, or the run artifact ``onnx/`` of a registered
version) holding ``model.onnx`` and ``config.json`` (everything an engine needs: shapes, the
noise schedule, the vocabulary; see components/export.py):

    engine = load_engine(Path("exports/digits-unet"))
    x = engine.sample(labels=np.arange(10), steps=50, guidance=2.0)   # (10, 1, 8, 8) in [-1, 1]
    engine = load_engine(Path("exports/pydoc-gpt"))
    texts = engine.sample_text("Return the ", length=200, count=2, temperature=0.8)

    sessions.py   onnxruntime sessions (cpu_cores, session_options, make_session)
    engines.py    one engine per graph kind, read_config, load_engine
    encdec.py     the encoder-decoder's engine (two graphs: encoder once, cached decoder steps)
    superres.py   the super-resolution engine (a denoiser that also reads the low-res image)
    textdiff.py   the prompt-conditioned denoiser's engine (two graphs: text encoder once, denoiser steps)

The sampling maths come from components/sampling/, shared with the PyTorch processes.
Where a registered version comes from is the registry's job (components/registry/resolve.py);
`genflow sample` itself is flows/sample.py. Heavy imports (onnxruntime, mlflow) happen inside
functions.
"""
from components.inference.encdec import EncDecEngine, load_encdec_engine
from components.inference.engines import (
    CONFIG_FILE,
    ENGINES,
    PARITY_FILE,
    CausalLMEngine,
    DiffusionEngine,
    Engine,
    MaskedLMEngine,
    Randn,
    TextEngine,
    load_engine,
    numpy_randn,
    read_config,
)
from components.inference.sessions import InferenceError, cpu_cores, make_session, session_options
from components.inference.superres import SuperResEngine
from components.inference.textdiff import TextDiffusionEngine

__all__ = [
    "CONFIG_FILE", "ENGINES", "PARITY_FILE", "Randn", "CausalLMEngine", "DiffusionEngine", "EncDecEngine", "Engine",
    "InferenceError", "MaskedLMEngine", "SuperResEngine", "TextDiffusionEngine", "TextEngine", "cpu_cores",
    "load_encdec_engine", "load_engine", "make_session", "numpy_randn", "read_config", "session_options",
]
