"""Plots of a comparison: matplotlib's Agg backend, each figure returned as PNG bytes.

    plots = make_plots(pipeline, machine)     # {"sampling_<dataset>.png", "compute.png", "stability.png": PNG}

matplotlib loads when a plot is drawn, not when this module is imported.
"""
from __future__ import annotations

import io
import math
import statistics
from typing import Optional

from components.compare.derive import achieved_gflops, diffusion_samplers, gpt_sampling, sequential_calls
from components.compare.model import BASELINE_NAMES, Machine, ModelResult, Pipeline

FAMILY_COLOURS = {"diffusion": "#1f77b4", "transformer": "#d62728"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_sampling(ds: str, models: list[ModelResult]) -> Optional[bytes]:
    """Quality and ms per item against sequential network calls per item (diffusion sweep vs GPT)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    unit = models[0].unit
    fig, (ax_q, ax_t) = plt.subplots(1, 2, figsize=(10, 3.8))
    quality_drawn = False
    for m in models:
        colour = FAMILY_COLOURS.get(m.family, "grey")
        if m.family == "diffusion":
            rs = diffusion_samplers(m)
            per = max(1, m.param("sample.length", 1, int)) if m.generation == "masked" else 1
            xs = [r["steps"] / per for r in rs]
            ax_t.plot(xs, [r["ms"] for r in rs], "o-", color=colour, label=m.key)
            for x, r in zip(xs, rs):
                ax_t.annotate(r["label"], (x, r["ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            q = [(x, r["quality"]) for x, r in zip(xs, rs) if r["quality"] is not None]
            if q:
                ax_q.plot(*zip(*q), "o-", color=colour, label=m.key)
                quality_drawn = True
        else:
            cached, nocache = gpt_sampling(m)
            x = sequential_calls(m)
            if cached is not None:
                ax_t.plot([x], [cached], "s", color=colour, label=f"{m.key} (KV cache)")
            if nocache is not None:
                ax_t.plot([x], [nocache], "^", color=colour, mfc="none", label=f"{m.key} (no cache)")
            if m.is_image and m.get("eval/fd") is not None:
                ax_q.plot([x], [m.get("eval/fd")], "s", color=colour, label=m.key)
                quality_drawn = True
    ref = models[0]
    if ref.is_image and quality_drawn:
        for name, style in (("real", ":"), ("kde", "--"), ("gaussian", "-.")):
            v = ref.get(f"baseline/{name}_fd")
            if v is not None:
                ax_q.axhline(v, color="grey", ls=style, lw=1,
                             label="real data" if name == "real" else f"{BASELINE_NAMES[name]} baseline")
        ax_q.set_ylabel("FD (lower is better)")
    elif quality_drawn:
        v = ref.get("baseline/real_sample_ngram_bpc")
        if v is not None:
            ax_q.axhline(v, color="grey", ls=":", lw=1, label="real text")
        ax_q.set_ylabel("n-gram bits/char of samples")
    ax_t.set_yscale("log")  # before the formatters: setting a scale resets them
    ys = [y for line in ax_q.get_lines() for y in line.get_ydata() if y > 0]
    log_q = bool(ys) and max(ys) / min(ys) > 20  # one far-off model would flatten the others' curves
    if log_q:
        ax_q.set_yscale("log")
    axes = (ax_q, ax_t)
    if not quality_drawn:  # e.g. text with a GPT only: the timing panel alone
        fig.delaxes(ax_q)
        axes = (ax_t,)
    for ax in axes:
        ax.set_xscale("log")
        for axis in (ax.xaxis, ax.yaxis) if ax is ax_t or log_q else (ax.xaxis,):
            axis.set_major_formatter(ticker.LogFormatter())  # 10, 20, 50: not 10^1, 2x10^1
            axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
        ax.set_xlabel(f"sequential network calls per {unit}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_t.set_ylabel(f"ms per {unit}")
    ax_q.set_title(f"{ds}: quality against sampling steps", fontsize=10)
    ax_t.set_title(f"{ds}: sampling time against steps", fontsize=10)
    return _png(fig)


def plot_compute(models: list[ModelResult], machine: Machine) -> bytes:
    """Achieved training GFLOP/s per model against the machine's matmul peak, and thread scaling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(10, 3.6))
    keys = [m.key for m in models]
    colours = [FAMILY_COLOURS.get(m.family, "grey") for m in models]
    ax_g.bar(keys, [achieved_gflops(m) for m in models], color=colours)
    ax_g.axhline(machine.best_peak, color="black", ls="--", lw=1,
                 label=f"measured fp32 matmul peak ({machine.best_peak:.0f})")
    ax_g.set_ylabel("training GFLOP/s")
    ax_g.set_title("achieved training compute", fontsize=10)
    ax_g.legend(fontsize=7)
    probed = [m for m in models if len(m.scaling) >= 2]
    if probed:
        sp = [m.scaling[max(m.scaling)] / m.scaling[min(m.scaling)] for m in probed]
        ax_s.bar([m.key for m in probed], sp, color=[FAMILY_COLOURS.get(m.family, "grey") for m in probed])
        if machine.peak_gflops_1thread > 0 and math.isfinite(machine.peak_gflops_1thread):
            ax_s.axhline(machine.peak_gflops / machine.peak_gflops_1thread, color="black", ls="--", lw=1,
                         label="matmul speedup")
            ax_s.legend(fontsize=7)
        ax_s.axhline(1, color="grey", lw=0.8)
        ax_s.set_ylabel("training items/s, 2 threads / 1 thread")
    else:
        ax_s.text(0.5, 0.5, "thread scaling not probed", ha="center", va="center", transform=ax_s.transAxes)
    ax_s.set_title("parallelism: thread scaling of training", fontsize=10)
    for ax in (ax_g, ax_s):
        ax.tick_params(axis="x", labelsize=7, rotation=15)
        ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def plot_stability(models: list[ModelResult]) -> Optional[bytes]:
    """The main metric of each seed, per model (only models with two seeds or more)."""
    seeded = [m for m in models if len(m.seeds) >= 2]
    if not seeded:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(seeded), figsize=(3.2 * len(seeded), 3), squeeze=False)
    for ax, m in zip(axes[0], seeded):
        ys = [s[m.main_metric] for s in m.seeds]
        ax.plot([s["seed"] for s in m.seeds], ys, "o", color=FAMILY_COLOURS.get(m.family, "grey"))
        ax.axhline(statistics.fmean(ys), color="grey", lw=1)
        ax.set_title(m.key, fontsize=9)
        ax.set_xlabel("train.seed")
        ax.set_ylabel(m.main_metric)
        ax.grid(alpha=0.3)
    return _png(fig)


def make_plots(pipeline: Pipeline, machine: Machine) -> dict[str, bytes]:
    plots = {}
    for ds in pipeline.datasets():
        ms = [m for m in pipeline.models if m.dataset == ds]
        png = plot_sampling(ds, ms)
        if png:
            plots[f"sampling_{ds}.png"] = png
    plots["compute.png"] = plot_compute(pipeline.models, machine)
    png = plot_stability(pipeline.models)
    if png:
        plots["stability.png"] = png
    return plots

