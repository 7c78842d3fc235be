"""Numbers derived from a model run's metrics and params: samplers and their steps, FLOPs, spread,
and the formatting of numbers for people.

How a model samples comes from the backbone registry (ModelResult.generation): denoising
(steps x every pixel at once), autoregressive (one token a network call) or masked (K calls
write a whole sequence).
"""
from __future__ import annotations

import math
import re
import statistics
from typing import Any, Optional

from components.compare.model import ModelResult
from components.resources import training_flops_per_s


def sampler_label(name: str) -> str:
    """'ddim20' -> 'DDIM-20', 'ddpm' -> 'DDPM', 'k32' -> 'K=32'."""
    m = re.fullmatch(r"(ddpm|ddim)(\d*)", name)
    if m:
        return m.group(1).upper() + (f"-{m.group(2)}" if m.group(2) else "")
    return f"K={name[1:]}" if re.fullmatch(r"k\d+", name) else name


def sampler_steps(m: ModelResult, name: str) -> Optional[int]:
    """Sequential network calls of a diffusion sampler: ddpm -> T, ddimN -> N, kN -> N (masked LM)."""
    r = re.fullmatch(r"(ddpm|ddim|k)(\d*)", name)
    if not r:
        return None
    if r.group(2):
        return int(r.group(2))
    if r.group(1) == "ddpm":
        return m.param("diffusion.timesteps", None, int)
    return m.param("sample.steps", None, int)


def diffusion_samplers(m: ModelResult) -> list[dict[str, Any]]:
    """[{name, label, steps, ms, quality}] of a diffusion model: the headline sampler and the sweep.

    ms is per generated item (image or character); quality is eval/fd (images) or
    eval/sample_ngram_bpc (masked LM text), None where not measured.
    """
    out = {}
    if m.generation == "masked":
        head = f"k{m.param('sample.steps', 0, int)}"
        qname = "eval/sample_ngram_bpc"
    else:
        sampler = m.params.get("sample.sampler", "ddim")
        head = sampler if sampler == "ddpm" else f"ddim{m.param('sample.steps', 0, int)}"
        qname = "eval/fd"
    for key in m.metrics:
        r = re.fullmatch(r"perf/sample_ms_per_item_((?:ddpm|ddim|k)\d*)", key)
        if r:
            name = r.group(1)
            out[name] = {"name": name, "ms": m.metrics[key], "quality": m.get(f"{qname}_{name}")}
    if head not in out:  # the headline is logged without a suffix
        out[head] = {"name": head, "ms": m.metrics["perf/sample_ms_per_item"], "quality": m.get(qname)}
    rows = []
    for name, r in out.items():
        steps = sampler_steps(m, name)
        if steps:
            rows.append({**r, "label": sampler_label(name), "steps": steps, "headline": name == head})
    return sorted(rows, key=lambda r: r["steps"])


def headline_steps(m: ModelResult) -> Optional[int]:
    heads = [r for r in diffusion_samplers(m) if r["headline"]]
    return heads[0]["steps"] if heads else None


def gpt_sampling(m: ModelResult) -> tuple[Optional[float], Optional[float]]:
    """(ms per item with the KV cache, without it) of a GPT."""
    if m.kind == "text":
        return (m.get("perf/sample_ms_per_token_cached") or m.get("perf/sample_ms_per_item"),
                m.get("perf/sample_ms_per_token_nocache"))
    return m.get("perf/sample_ms_per_item"), m.get("perf/sample_ms_per_item_nocache")


def sequential_calls(m: ModelResult) -> Optional[float]:
    """Network calls one after another to generate one item (image, or character of text)."""
    if m.generation == "autoregressive":
        return float(m.tokens_per_item)      # one call per token
    steps = headline_steps(m)
    if steps is None:
        return None
    if m.generation == "masked":              # K calls write the whole sequence of sample.length characters
        return steps / max(1, m.param("sample.length", 1, int))
    return float(steps)                       # every pixel at once, at each step


def train_flops_per_item(m: ModelResult) -> float:
    """Training FLOPs (forward + backward) per item: per image, or per character of text."""
    return m.metrics["perf/flops_per_item"] * (m.tokens_per_item if m.family == "transformer" else 1)


def sample_flops_per_item(m: ModelResult) -> Optional[float]:
    """Estimated sampling FLOPs per generated item: forward = 1/3 of training's forward + backward.

    diffusion: steps forward passes per image (x2 with classifier-free guidance > 1);
    masked LM: K passes over block_size tokens per sample.length characters; GPT: one token's
    forward per token (with the KV cache the average cost per token matches a full pass's).
    """
    fwd = m.metrics["perf/flops_per_item"] / 3
    if m.generation == "autoregressive":
        return fwd * m.tokens_per_item
    steps = headline_steps(m)
    if steps is None:
        return None
    if m.generation == "masked":
        T = m.param("gpt.block_size", 128, int)
        return steps * T * fwd / max(1, m.param("sample.length", 1, int))
    g = m.param("sample.guidance", 1.0)
    return steps * fwd * (2 if g not in (0.0, 1.0) else 1)


def achieved_gflops(m: ModelResult) -> float:
    return training_flops_per_s(m.metrics) / 1e9


def spread(values: list[float]) -> tuple[float, float, float]:
    """(mean, sample std, coefficient of variation)."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd, (sd / abs(mean) if mean else float("inf"))


# ---------------------------------------------------------------------------
# Formatting numbers for people
# ---------------------------------------------------------------------------

def fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def si(v: Optional[float], unit: str = "") -> str:
    """12.3e6 -> '12.3 M'."""
    if v is None or not math.isfinite(v):
        return "-"
    for div, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g} {p}{unit}"
    return f"{v:.3g} {unit}".rstrip()


def mb(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v / 1024:.2f} GB" if v >= 1024 else f"{v:.0f} MB")

