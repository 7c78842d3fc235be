"""The seed essay's Table 1, measured: diffusion against transformer models of one pipeline run.

    pipeline = collect(client, "genflow", run_id=None)   # the latest pipeline run's models, from MLflow
    report = make_report(pipeline, machine)               # rows: the essay's claim, the numbers, a verdict
    write_report(report, root / "reports" / "compare")    # report.html (self-contained), report.md, PNGs

A pipeline run is one parent MLflow run per dataset experiment (tag genflow.kind = pipeline,
siblings listed in genflow.pipeline_runs), each with one nested child run per model, named by
its key. A model the run skipped (inputs unchanged) is read from the run of the version it kept.

Each row quotes the essay's claim for the two families and says whether the measurements on
this machine agree, disagree, or are mixed (some numbers each way); "not measured" when a
dataset lacks one family or a number. The thresholds behind the verdicts are constants below.

MLflow is only used through the client passed in; matplotlib loads when plots are drawn.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from components.files import replaced_dir


class CompareError(ValueError):
    """The comparison cannot be built from what MLflow holds; the message says which run and why."""


# Every finished model run must carry these (older genflow runs lack some: refuse, never half a report).
REQUIRED_METRICS = ("perf/params", "perf/train_seconds", "perf/train_items_per_s", "perf/flops_per_item",
                    "perf/sample_ms_per_item", "train/loss")
MAIN_METRIC = {"image": "eval/fd", "text": "eval/bits_per_char"}

# Verdict thresholds (stated in the report).
STABLE_LOSS_CV = 0.10        # final loss across seeds: coefficient of variation at most this is "stable"
STABLE_METRIC_CV = 0.20      # the main metric across seeds
SCALING_TIE = 1.05           # 2-thread speedups within 5% of each other count as equal
GENERALISES_NN_RATIO = 0.8   # eval/nn_ratio at least this: samples are as far from train as fresh data
COPIES_NN_RATIO = 0.5        # at most this: samples sit on training images

AGREES, DISAGREES, MIXED, NOT_MEASURED = "agrees", "disagrees", "mixed", "not measured"
BASELINE_NAMES = {"real": "real data", "kde": "KDE", "gaussian": "Gaussian"}

# The essay's words, quoted (Table 1, or its strengths/weaknesses lists where Table 1 has no row).
CLAIMS: dict[str, tuple[str, str]] = {
    "Generation quality": ("high, very realistic", "high, coherent"),
    "Sampling speed": ("slow, iterative process", "relatively fast, parallel processing"),
    "Computational cost": ("high, long training times", "high for large models, but efficient for inference"),
    "Parameters and memory": ("(no claim)", "large models: high computational demands and memory requirements"),
    "Parallel processing": ("limited", "excellent, inherent to the architecture"),
    "Training stability": ("generally stable, less prone to mode collapse",
                           "generally stable, but mode collapse can occur"),
    "Memorisation": ("robust generalization capabilities", "(no claim)"),
}
NOT_MEASURED_ROWS = ("Data Type Focus", "Long-Range Dependencies", "Interpretability", "Primary Applications")


# ---------------------------------------------------------------------------
# What a model run holds
# ---------------------------------------------------------------------------

@dataclass
class ModelResult:
    key: str
    family: str                       # diffusion | transformer
    backbone: str                     # unet | dit | gpt | mdlm
    dataset: str
    kind: str                         # image | text
    run_id: str
    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    experiment_id: str = ""
    note: str = ""                    # e.g. "skipped in this run; version 3 (run ...)"
    seeds: list[dict[str, float]] = field(default_factory=list)   # one per seed: seed, train/loss, main metric
    seeds_source: str = ""            # "mlflow" (runs found) or "retrained" (--seeds)
    scaling: dict[int, float] = field(default_factory=dict)       # threads -> training items/s (live probe)

    def param(self, name: str, default: Any = None, cast=float) -> Any:
        try:
            return cast(self.params[name])
        except (KeyError, ValueError, TypeError):
            return default

    @property
    def main_metric(self) -> str:
        return MAIN_METRIC[self.kind]

    @property
    def unit(self) -> str:
        """What one generated item is: an image, or a character of text."""
        return "image" if self.kind == "image" else "char"

    @property
    def tokens_per_item(self) -> int:
        """Tokens per generated item for a GPT (pixels of an image; 1 for a character)."""
        if self.kind == "image":
            return int(self.param("dataset.image_size", 8)) ** 2
        return 1

    def get(self, name: str) -> Optional[float]:
        v = self.metrics.get(name)
        return v if v is not None and math.isfinite(v) else None


@dataclass
class Pipeline:
    run_ids: dict[str, str]           # dataset -> parent run id
    flow_run_id: str
    started: str                      # parent run's start, local time
    models: list[ModelResult]
    notes: list[str] = field(default_factory=list)

    def datasets(self) -> list[str]:
        return sorted({m.dataset for m in self.models})


@dataclass
class Machine:
    cores: int
    cpu: str
    peak_gflops: float                # fp32 matmul, all cores
    peak_gflops_1thread: float = float("nan")
    torch: str = ""

    @property
    def best_peak(self) -> float:
        """The higher of the two: on a busy machine the all-core figure can come out below one core's."""
        return max(v for v in (self.peak_gflops, self.peak_gflops_1thread, 0.0) if math.isfinite(v))


@dataclass
class Row:
    dataset: str
    feature: str
    cells: dict[str, str]             # model key -> what was measured, in words and numbers
    verdict: str
    evidence: str                     # the numbers behind the verdict, one sentence


@dataclass
class Report:
    pipeline: Pipeline
    machine: Machine
    rows: list[Row]
    plots: dict[str, bytes] = field(default_factory=dict)   # file name -> PNG
    created: str = ""


# ---------------------------------------------------------------------------
# Collect: the pipeline run and its model runs, from MLflow
# ---------------------------------------------------------------------------

def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise CompareError(f"--run {run_id}: no such MLflow run in this tracking store; "
                           "omit --run for the latest pipeline run, or copy a run id from `genflow ui`") from None


def _experiments(client, prefix: str) -> list:
    return [e for e in client.search_experiments() if e.name.startswith(f"{prefix}-")]


def find_pipeline(client, prefix: str, run_id: Optional[str] = None) -> dict[str, Any]:
    """{dataset: parent run} of one pipeline run: `run_id`'s (a parent, or a model run's parent), else the latest."""
    if run_id:
        run = _get_run(client, run_id)
        if run.data.tags.get("genflow.kind") != "pipeline":
            parent_id = run.data.tags.get("mlflow.parentRunId")
            if not parent_id:
                raise CompareError(f"--run {run_id}: run {run.info.run_name!r} is not a genflow pipeline run "
                                   "(no tag genflow.kind=pipeline) and has no parent; pass a pipeline run id")
            run = _get_run(client, parent_id)
    else:
        exps = _experiments(client, prefix)
        if not exps:
            raise CompareError(f"no experiment named {prefix}-<dataset> in the tracking store: "
                               "run `genflow run` (or `genflow run --quick`) first")
        runs = client.search_runs([e.experiment_id for e in exps], "tags.`genflow.kind` = 'pipeline'",
                                  order_by=["attributes.start_time DESC"], max_results=50)
        runs = [r for r in runs if r.info.status != "RUNNING"]  # a pipeline still running has no results yet
        if not runs:
            raise CompareError(f"no finished pipeline run in the experiments {', '.join(e.name for e in exps)}: "
                               "run `genflow run` first")
        run = runs[0]
    siblings = _json_tag(run, "genflow.pipeline_runs")
    parents = {}
    for ds, rid in (siblings or {}).items():
        try:
            parents[ds] = client.get_run(rid)
        except Exception:  # a deleted sibling: compare what is left
            continue
    if not parents:  # no sibling list: the run alone, its dataset taken from the experiment name
        exp = client.get_experiment(run.info.experiment_id)
        parents[exp.name.split("-", 1)[-1]] = run
    return parents


def _json_tag(run, name: str) -> Any:
    try:
        return json.loads(run.data.tags.get(name) or "null")
    except ValueError:
        return None


def model_result(run, note: str = "") -> ModelResult:
    tags, params = run.data.tags, run.data.params
    key = tags.get("genflow.model_key") or params.get("model_key") or run.info.run_name
    backbone = tags.get("genflow.backbone", "")
    family = tags.get("genflow.family") or ("transformer" if backbone == "gpt" else "diffusion")
    kind = params.get("dataset.kind") or ("text" if backbone == "mdlm" else "image")
    return ModelResult(key=key, family=family, backbone=backbone, dataset=tags.get("genflow.dataset", ""),
                       kind=kind, run_id=run.info.run_id, metrics=dict(run.data.metrics), params=dict(params),
                       experiment_id=run.info.experiment_id, note=note)


def check_model(m: ModelResult) -> None:
    """Refuse a run from an older report format: every required metric and the main one must be there."""
    need = list(REQUIRED_METRICS) + [m.main_metric]
    missing = [k for k in need if m.get(k) is None]
    if missing:
        raise CompareError(f"run {m.run_id} ({m.key}): lacks {', '.join(missing)}; it was logged by an older "
                           "genflow or did not finish evaluating: rerun `genflow run` and compare again")


def _summary(client, parent_id: str) -> dict:
    """The pipeline's last_run.json (logged on each parent run), {} if absent."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent_id, "last_run.json", tmp)
            return json.loads(Path(path).read_text())
    except Exception:
        return {}


def collect(client, prefix: str, run_id: Optional[str] = None) -> Pipeline:
    """The models of one pipeline run with their metrics and params (see module doc). Raises CompareError."""
    parents = find_pipeline(client, prefix, run_id)
    first = next(iter(parents.values()))
    models, notes, seen = [], [], set()
    for ds, parent in sorted(parents.items()):
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=500)
        for child in sorted(children, key=lambda r: r.info.run_name or ""):
            m = model_result(child)
            if child.info.status != "FINISHED":
                notes.append(f"{m.key}: run {child.info.run_id} ended {child.info.status}; left out")
                continue
            check_model(m)
            models.append(m)
            seen.add(m.key)
    # Models the run skipped (inputs unchanged) have no child run: use the run of the version they kept.
    summary = _summary(client, first.info.run_id)
    for key, info in (summary.get("models") or {}).items():
        if key in seen or info.get("status") != "skipped" or not info.get("version"):
            continue
        try:
            source = client.get_model_version(key, str(info["version"])).run_id
            run = client.get_run(source)
        except Exception:
            notes.append(f"{key}: skipped by this run, and version {info['version']} was not found; left out")
            continue
        m = model_result(run, note=f"skipped (inputs unchanged): numbers of version {info['version']}, "
                                   f"run {source}")
        check_model(m)
        models.append(m)
        seen.add(key)
    if not models:
        ids = ", ".join(p.info.run_id for p in parents.values())
        raise CompareError(f"pipeline run {ids}: has no finished model runs to compare; "
                           "run `genflow run` and compare again")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.info.start_time / 1000))
    return Pipeline(run_ids={ds: p.info.run_id for ds, p in parents.items()},
                    flow_run_id=first.data.tags.get("genflow.flow_run_id", "none"),
                    started=started, models=models, notes=notes)


def seed_history(client, m: ModelResult, max_runs: int = 200) -> list[dict[str, float]]:
    """Final loss and main metric of finished runs of the same model that differ only in train.seed.

    Same model key, same params except train.seed, same evaluation data; for each seed the
    latest run. The run `m` itself is always included.
    """
    same = {k: v for k, v in m.params.items() if k != "train.seed"}
    runs = client.search_runs([m.experiment_id], f"tags.`genflow.model_key` = '{m.key}'",
                              order_by=["attributes.start_time DESC"], max_results=max_runs)
    eval_hash = None
    by_seed: dict[float, dict[str, float]] = {}
    for r in runs:
        if r.info.run_id == m.run_id:
            eval_hash = r.data.tags.get("genflow.eval_data_hash")
    own_seed = m.param("train.seed", 0.0)
    by_seed[own_seed] = {"seed": own_seed, "train/loss": m.metrics["train/loss"],
                         m.main_metric: m.metrics[m.main_metric]}
    for r in runs:
        if r.info.status != "FINISHED" or r.info.run_id == m.run_id:
            continue
        p = dict(r.data.params)
        if {k: v for k, v in p.items() if k != "train.seed"} != same:
            continue
        if eval_hash and r.data.tags.get("genflow.eval_data_hash") != eval_hash:
            continue
        try:
            seed = float(p.get("train.seed", "nan"))
        except ValueError:
            continue
        met = r.data.metrics
        if seed in by_seed or "train/loss" not in met or m.main_metric not in met:
            continue
        by_seed[seed] = {"seed": seed, "train/loss": met["train/loss"], m.main_metric: met[m.main_metric]}
    return [by_seed[s] for s in sorted(by_seed)]


# ---------------------------------------------------------------------------
# Derived numbers
# ---------------------------------------------------------------------------

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
    if m.backbone == "mdlm":
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
    if m.family == "transformer":
        return float(m.tokens_per_item)      # one call per token
    steps = headline_steps(m)
    if steps is None:
        return None
    if m.backbone == "mdlm":                  # K calls write the whole sequence of sample.length characters
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
    if m.family == "transformer":
        return fwd * m.tokens_per_item
    steps = headline_steps(m)
    if steps is None:
        return None
    if m.backbone == "mdlm":
        T = m.param("gpt.block_size", 128, int)
        return steps * T * fwd / max(1, m.param("sample.length", 1, int))
    g = m.param("sample.guidance", 1.0)
    return steps * fwd * (2 if g not in (0.0, 1.0) else 1)


def achieved_gflops(m: ModelResult) -> float:
    return m.metrics["perf/flops_per_item"] * m.metrics["perf/train_items_per_s"] / 1e9


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


def _mb(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v / 1024:.2f} GB" if v >= 1024 else f"{v:.0f} MB")


def combine(parts: Iterable[str]) -> str:
    """Verdict of several parts: all agree -> agrees, all disagree -> disagrees, else mixed."""
    parts = [p for p in parts if p != NOT_MEASURED]
    if not parts:
        return NOT_MEASURED
    if all(p == AGREES for p in parts):
        return AGREES
    if all(p == DISAGREES for p in parts):
        return DISAGREES
    return MIXED


def _vote(flags: list[bool]) -> str:
    """All True -> agrees, all False -> disagrees, some of each -> mixed."""
    if not flags:
        return NOT_MEASURED
    return AGREES if all(flags) else DISAGREES if not any(flags) else MIXED


# ---------------------------------------------------------------------------
# Rows: one function per feature of Table 1 (models of one dataset)
# ---------------------------------------------------------------------------

def _families(models: list[ModelResult]) -> tuple[list[ModelResult], list[ModelResult]]:
    return ([m for m in models if m.family == "diffusion"], [m for m in models if m.family == "transformer"])


def _missing_family(ds: str, models: list[ModelResult]) -> Optional[str]:
    diff, tr = _families(models)
    if not diff:
        return f"no diffusion model on {ds} in this run"
    if not tr:
        return f"no transformer model on {ds} in this run"
    return None


def row_quality(ds: str, models: list[ModelResult]) -> Row:
    cells, flags, ev = {}, [], []
    for m in models:
        if m.kind == "image":
            fd, real = m.get("eval/fd"), m.get("baseline/real_fd")
            simple = {n: m.get(f"baseline/{n}_fd") for n in ("kde", "gaussian")}
            simple = {n: v for n, v in simple.items() if v is not None}
            text = f"FD {fmt(fd)} (real data {fmt(real)}"
            text += "".join(f", {BASELINE_NAMES[n]} {fmt(v)}" for n, v in simple.items()) + ")"
            if m.get("eval/class_acc") is not None:
                text += (f"; class accuracy {fmt(m.get('eval/class_acc'), 2)} "
                         f"(real {fmt(m.get('baseline/real_class_acc'), 2)})")
            if m.get("eval/bits_per_dim") is not None:
                text += (f"; {fmt(m.get('eval/bits_per_dim'))} bits/dim (pixel logistic regression "
                         f"{fmt(m.get('baseline/logreg_bits_per_dim'))})")
            if simple and fd is not None:
                name, best = min(simple.items(), key=lambda kv: kv[1])
                flags.append(fd < best)
                ev.append(f"{m.key} FD {fmt(fd)} {'<' if fd < best else '>='} "
                          f"{BASELINE_NAMES[name]} baseline {fmt(best)}")
        else:
            bpc = m.get("eval/bits_per_char")
            ngrams = {int(k.split("ngram")[1].split("_")[0]): v for k, v in m.metrics.items()
                      if re.fullmatch(r"baseline/ngram\d+_bits_per_char", k)}
            bound = " (upper bound)" if m.get("eval/bits_per_char_is_upper_bound") else ""
            text = f"{fmt(bpc)} bits/char{bound}"
            if ngrams:
                n, best = min(ngrams.items(), key=lambda kv: kv[1])
                text += f" (best n-gram: {n}-gram {fmt(best)})"
                flags.append(bpc < best)
                ev.append(f"{m.key} {fmt(bpc)} bits/char {'<' if bpc < best else '>='} {n}-gram {fmt(best)}")
        cells[m.key] = text
    verdict = _vote(flags)
    evidence = "; ".join(ev) if ev else "no baseline to compare with"
    return Row(ds, "Generation quality", cells, verdict,
               f"'high' = better than the best simple baseline: {evidence}")


def row_sampling_speed(ds: str, models: list[ModelResult]) -> Row:
    cells, diff_ms, tr_ms = {}, [], []
    for m in models:
        unit = m.unit
        if m.family == "diffusion":
            rs = diffusion_samplers(m)
            cells[m.key] = "; ".join(f"{r['label']}: {fmt(r['ms'])} ms/{unit} ({r['steps']} steps)" for r in rs)
            diff_ms += [(m.key, r["label"], r["ms"]) for r in rs]
        else:
            cached, nocache = gpt_sampling(m)
            text = f"{fmt(cached)} ms/{unit} with KV cache"
            if nocache is not None:
                text += f", {fmt(nocache)} without"
            if m.kind == "image":
                text += f" ({m.tokens_per_item} tokens per image)"
            cells[m.key] = text
            if cached is not None:
                tr_ms.append((m.key, cached))
    missing = _missing_family(ds, models)
    if missing or not diff_ms or not tr_ms:
        return Row(ds, "Sampling speed", cells, NOT_MEASURED, missing or "no timings")
    tkey, fastest_tr = min(tr_ms, key=lambda t: t[1])
    slower = [(k, lab, ms) for k, lab, ms in diff_ms if ms > fastest_tr]
    verdict = _vote([ms > fastest_tr for _, _, ms in diff_ms])
    unit = models[0].unit
    ev = (f"{len(slower)} of {len(diff_ms)} diffusion samplers slower than {tkey} ({fmt(fastest_tr)} ms/{unit}): "
          + ", ".join(f"{lab} {fmt(ms)}" for _, lab, ms in diff_ms))
    return Row(ds, "Sampling speed", cells, verdict, ev)


def row_cost(ds: str, models: list[ModelResult], machine: Machine) -> Row:
    cells = {}
    for m in models:
        unit = m.unit
        budget = m.param("train.max_seconds")
        g = achieved_gflops(m)
        share = g / machine.best_peak if machine.best_peak > 0 else float("nan")
        total = m.metrics["perf/flops_per_item"] * m.metrics["perf/train_items_per_s"] * m.metrics["perf/train_seconds"]
        text = (f"trained {fmt(m.metrics['perf/train_seconds'])} s"
                + (f" (budget {fmt(budget)} s)" if budget else "")
                + f"; {si(train_flops_per_item(m), 'FLOP')}/{unit} to train, {si(total, 'FLOP')} in all; "
                f"{fmt(g)} GFLOP/s = {share:.0%} of the matmul peak")
        sf = sample_flops_per_item(m)
        if sf is not None:
            text += f"; ~{si(sf, 'FLOP')}/{unit} to sample"
        cells[m.key] = text
    missing = _missing_family(ds, models)
    if missing:
        return Row(ds, "Computational cost", cells, NOT_MEASURED, missing)
    diff, tr = _families(models)
    unit = models[0].unit
    d_train, t_train = max(train_flops_per_item(m) for m in diff), min(train_flops_per_item(m) for m in tr)
    parts = [AGREES if d_train > t_train else DISAGREES]
    ev = [f"training per {unit}: diffusion {si(d_train, 'FLOP')} vs transformer {si(t_train, 'FLOP')}"]
    d_s = [f for f in (sample_flops_per_item(m) for m in diff) if f is not None]
    t_s = [f for f in (sample_flops_per_item(m) for m in tr) if f is not None]
    if d_s and t_s:
        parts.append(AGREES if min(t_s) < min(d_s) else DISAGREES)
        ev.append(f"sampling per {unit}: transformer ~{si(min(t_s), 'FLOP')} vs diffusion ~{si(min(d_s), 'FLOP')}")
    ev.append("training seconds follow the budgets in params.yaml, so they are shown, not judged")
    return Row(ds, "Computational cost", cells, combine(parts), "; ".join(ev))


def row_memory(ds: str, models: list[ModelResult]) -> Row:
    cells = {}
    for m in models:
        text = f"{si(m.metrics['perf/params'])} parameters"
        tr, trd = m.get("perf/peak_rss_train_mb"), m.get("perf/peak_rss_train_delta_mb")
        sa, sad = m.get("perf/peak_rss_sample_mb"), m.get("perf/peak_rss_sample_delta_mb")
        if tr is not None:
            text += f"; peak RSS training {_mb(tr)}" + (f" (+{_mb(trd)})" if trd is not None else "")
        if sa is not None:
            text += f", sampling {_mb(sa)}" + (f" (+{_mb(sad)})" if sad is not None else "")
        if tr is None and sa is None:
            text += "; peak RSS not recorded"
        cells[m.key] = text
    missing = _missing_family(ds, models)
    if missing:
        return Row(ds, "Parameters and memory", cells, NOT_MEASURED, missing)
    diff, tr = _families(models)
    metric = "perf/peak_rss_train_delta_mb"
    if not all(m.get(metric) is not None for m in models):
        metric = "perf/params"  # older runs: parameters are the only size measured
    d, t = max(m.metrics[metric] for m in diff), max(m.metrics[metric] for m in tr)
    what = "memory added while training" if metric != "perf/params" else "parameters (no memory recorded)"
    show = _mb if metric != "perf/params" else si
    return Row(ds, "Parameters and memory", cells, AGREES if t > d else DISAGREES,
               f"{what}: transformer {show(t)} vs diffusion {show(d)} (small models: the claim is about large ones)")


def row_parallel(ds: str, models: list[ModelResult]) -> Row:
    cells, speedups = {}, {}
    for m in models:
        unit = "images" if m.unit == "image" and m.family == "diffusion" else "tokens"
        parts = []
        if len(m.scaling) >= 2:
            lo, hi = min(m.scaling), max(m.scaling)
            speedups[m.key] = m.scaling[hi] / m.scaling[lo]
            parts.append(f"training {fmt(m.scaling[lo])} {unit}/s on {lo} thread, {fmt(m.scaling[hi])} on {hi} "
                         f"(x{speedups[m.key]:.2f})")
        else:
            parts.append("training thread scaling not probed")
        calls = sequential_calls(m)
        if m.family == "transformer":
            parts.append(f"sampling: {m.tokens_per_item if m.kind == 'image' else 1} sequential network call(s) "
                         f"per {m.unit}, one token each")
        elif m.backbone == "mdlm":
            parts.append(f"sampling: {headline_steps(m)} sequential calls per {m.param('sample.length', 0, int)} "
                         f"characters ({fmt(calls)} per char), all positions at once")
        elif calls is not None:
            parts.append(f"sampling: {int(calls)} sequential network calls per image, all pixels at once")
        cells[m.key] = "; ".join(parts)
    missing = _missing_family(ds, models)
    if missing:
        return Row(ds, "Parallel processing", cells, NOT_MEASURED, missing)
    diff, tr = _families(models)
    verdicts, ev = [], []
    d_sp = [speedups[m.key] for m in diff if m.key in speedups]
    t_sp = [speedups[m.key] for m in tr if m.key in speedups]
    if d_sp and t_sp:
        d, t = max(d_sp), max(t_sp)
        verdicts.append(AGREES if t > d * SCALING_TIE else DISAGREES)
        rel = "higher" if t > d * SCALING_TIE else "lower" if t < d / SCALING_TIE else "about equal"
        ev.append(f"2-thread training speedup: transformer x{t:.2f} vs diffusion x{d:.2f} ({rel})"
                  + (" - below x1: other work was using the cores" if min(d, t) < 1 else ""))
    d_calls = [c for c in (sequential_calls(m) for m in diff) if c is not None]
    t_calls = [c for c in (sequential_calls(m) for m in tr) if c is not None]
    if d_calls and t_calls:
        d, t = min(d_calls), min(t_calls)
        verdicts.append(AGREES if d > t else DISAGREES)
        ev.append(f"sequential network calls per {models[0].unit} when sampling: diffusion {fmt(d)} vs "
                  f"transformer {fmt(t)}")
    return Row(ds, "Parallel processing", cells, combine(verdicts), "; ".join(ev) or "nothing measured")


def row_stability(ds: str, models: list[ModelResult]) -> Row:
    cells, stable, ev = {}, [], []
    for m in models:
        parts = []
        if len(m.seeds) >= 2:
            loss = spread([s["train/loss"] for s in m.seeds])
            main = spread([s[m.main_metric] for s in m.seeds])
            name = m.main_metric.split("/")[1]
            parts.append(f"final loss {fmt(loss[0])} ± {fmt(loss[1], 2)} (CV {loss[2]:.0%}), {name} {fmt(main[0])} "
                         f"± {fmt(main[1], 2)} (CV {main[2]:.0%}) over {len(m.seeds)} seeds"
                         + (f" (retrained, {int(m.seeds[0].get('steps', 0))} steps each)"
                            if m.seeds_source == "retrained" and m.seeds[0].get("steps") else ""))
            ok = loss[2] <= STABLE_LOSS_CV and main[2] <= STABLE_METRIC_CV
            stable.append(ok)
            ev.append(f"{m.key} loss CV {loss[2]:.0%}, {name} CV {main[2]:.0%}")
        else:
            parts.append("1 seed: run genflow compare --seeds 3")
        if m.get("eval/recall") is not None:
            parts.append(f"recall {fmt(m.get('eval/recall'), 2)} (real {fmt(m.get('baseline/real_recall'), 2)})")
        cells[m.key] = "; ".join(parts)
    verdicts = []
    if stable and len(stable) == len(models):
        verdicts.append(_vote(stable))
        ev.insert(0, f"'stable' = final-loss CV <= {STABLE_LOSS_CV:.0%} and main-metric CV <= {STABLE_METRIC_CV:.0%}")
    else:
        ev.insert(0, "spread over seeds not measured (1 seed: run genflow compare --seeds 3)")
    diff, tr = _families(models)
    d_rec = [m.get("eval/recall") for m in diff if m.get("eval/recall") is not None]
    t_rec = [m.get("eval/recall") for m in tr if m.get("eval/recall") is not None]
    if d_rec and t_rec:
        d, t = max(d_rec), max(t_rec)
        verdicts.append(AGREES if d >= t else DISAGREES)
        ev.append(f"mode coverage (recall): diffusion {fmt(d, 2)} vs transformer {fmt(t, 2)}")
    return Row(ds, "Training stability", cells, combine(verdicts), "; ".join(ev))


def row_memorisation(ds: str, models: list[ModelResult]) -> Row:
    cells, verdicts, ev = {}, [], []
    for m in models:
        r = m.get("eval/nn_ratio")
        if r is None:
            cells[m.key] = "not measured (no nearest-neighbour metric for text)" if m.kind == "text" else "-"
            continue
        cells[m.key] = (f"NN ratio {fmt(r, 2)} (real {fmt(m.get('baseline/real_nn_ratio'), 2)}, "
                        f"KDE {fmt(m.get('baseline/kde_nn_ratio'), 2)}; ~0 = copies of training images"
                        + ("; well above 1 = farther from the data than real images" if r > 1.2 else "") + ")")
        if m.family == "diffusion":
            verdicts.append(AGREES if r >= GENERALISES_NN_RATIO else DISAGREES if r <= COPIES_NN_RATIO else MIXED)
            ev.append(f"{m.key} NN ratio {fmt(r, 2)}")
    verdict = combine(verdicts)
    text = (f"generalises = NN ratio >= {GENERALISES_NN_RATIO}, copies = <= {COPIES_NN_RATIO}: " + "; ".join(ev)
            if ev else "no diffusion model with a nearest-neighbour metric on this dataset")
    return Row(ds, "Memorisation", cells, verdict, text)


def make_rows(pipeline: Pipeline, machine: Machine) -> list[Row]:
    rows = []
    for ds in pipeline.datasets():
        ms = [m for m in pipeline.models if m.dataset == ds]
        ms.sort(key=lambda m: (m.family != "diffusion", m.key))  # diffusion first: side by side
        rows += [row_quality(ds, ms), row_sampling_speed(ds, ms), row_cost(ds, ms, machine),
                 row_memory(ds, ms), row_parallel(ds, ms), row_stability(ds, ms), row_memorisation(ds, ms)]
    return rows


def overall(rows: list[Row], feature: str) -> str:
    return combine(r.verdict for r in rows if r.feature == feature)


# ---------------------------------------------------------------------------
# Plots (matplotlib's Agg backend; PNG bytes)
# ---------------------------------------------------------------------------

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
            per = 1 if m.backbone != "mdlm" else max(1, m.param("sample.length", 1, int))
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
            if m.kind == "image" and m.get("eval/fd") is not None:
                ax_q.plot([x], [m.get("eval/fd")], "s", color=colour, label=m.key)
                quality_drawn = True
    ref = models[0]
    if ref.kind == "image" and quality_drawn:
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


def make_report(pipeline: Pipeline, machine: Machine, plots: bool = True) -> Report:
    return Report(pipeline, machine, make_rows(pipeline, machine),
                  make_plots(pipeline, machine) if plots else {},
                  created=time.strftime("%Y-%m-%d %H:%M:%S"))


# ---------------------------------------------------------------------------
# Render: Markdown and self-contained HTML
# ---------------------------------------------------------------------------

def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_table(report: Report) -> str:
    """The one-table answer: each feature, the essay's claim, the evidence per dataset, the verdict."""
    ds = report.pipeline.datasets()
    lines = ["| Feature | Seed essay: diffusion | Seed essay: transformer | " + " | ".join(ds) + " | Verdict |",
             "|---|---|---|" + "---|" * len(ds) + "---|"]
    for feature, (cd, ct) in CLAIMS.items():
        cells = []
        for d in ds:
            row = next((r for r in report.rows if r.dataset == d and r.feature == feature), None)
            cells.append(f"**{row.verdict}**: {_md(row.evidence)}" if row else "-")
        lines.append(f"| {feature} | {_md(cd)} | {_md(ct)} | " + " | ".join(cells)
                     + f" | **{overall(report.rows, feature)}** |")
    return "\n".join(lines)


def _machine_line(m: Machine) -> str:
    one = (f", {m.peak_gflops_1thread:.0f} GFLOP/s on 1 thread"
           if m.peak_gflops_1thread > 0 and math.isfinite(m.peak_gflops_1thread) else "")
    return (f"{m.cpu or 'CPU'}, {m.cores} cores; fp32 matmul peak {m.peak_gflops:.0f} GFLOP/s on {m.cores} "
            f"threads{one} (shares of the peak below use {m.best_peak:.0f}"
            + ("; all cores slower than one: other work was using them" if m.peak_gflops < m.peak_gflops_1thread
               else "") + f"); torch {m.torch or '?'}")


def _source_lines(report: Report) -> list[str]:
    p = report.pipeline
    out = [f"Pipeline run of {p.started} (flow run {p.flow_run_id}); parent runs: "
           + ", ".join(f"{ds} `{rid}`" for ds, rid in sorted(p.run_ids.items())),
           f"Machine: {_machine_line(report.machine)}. Timings on a shared machine are noisy; read them as a lead.",
           "Budgets: " + ", ".join(f"{m.key} {fmt(m.param('train.max_seconds'))} s / "
                                   f"{fmt(m.param('train.max_steps'))} steps" for m in p.models)]
    out += [f"Note: {m.key}: {m.note}" for m in p.models if m.note]
    out += [f"Note: {n}" for n in p.notes]
    return out


def render_markdown(report: Report) -> str:
    p = report.pipeline
    out = ["# Diffusion vs transformer models, measured", "",
           "The seed essay's Table 1, claim by claim, against what this pipeline run measured.", ""]
    out += [f"- {line}" for line in _source_lines(report)]
    out += ["", "## Summary", "", summary_table(report), "",
            f"Not measured here: {', '.join(NOT_MEASURED_ROWS)}.", ""]
    for ds in p.datasets():
        ms = sorted([m for m in p.models if m.dataset == ds], key=lambda m: (m.family != "diffusion", m.key))
        out += [f"## {ds}", "",
                "| Feature | Claim (diffusion / transformer) | "
                + " | ".join(f"{m.key} ({m.family})" for m in ms) + " | Verdict |",
                "|---|---|" + "---|" * len(ms) + "---|"]
        for r in (r for r in report.rows if r.dataset == ds):
            cd, ct = CLAIMS[r.feature]
            out.append(f"| {r.feature} | {_md(cd)} / {_md(ct)} | "
                       + " | ".join(_md(r.cells.get(m.key, "-")) for m in ms)
                       + f" | **{r.verdict}**: {_md(r.evidence)} |")
        out.append("")
        if f"sampling_{ds}.png" in report.plots:
            out += [f"![{ds}: sampling]({f'sampling_{ds}.png'})", ""]
    for name, title in (("compute.png", "Compute"), ("stability.png", "Stability over seeds")):
        if name in report.plots:
            out += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(out) + "\n"


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}
.agrees{background:#e3f6e3}.disagrees{background:#fbe2e2}.mixed{background:#fff4d6}
.not-measured{background:#eee;color:#666}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
code{font-size:12px}
"""


def _verdict_td(verdict: str, evidence: str) -> str:
    cls = verdict.replace(" ", "-")
    return f'<td class="{cls}"><b>{html.escape(verdict)}</b>: {html.escape(evidence)}</td>'


def render_html(report: Report) -> str:
    """One file: inline CSS, PNGs embedded as base64 data URIs, no external references."""
    e = html.escape
    p = report.pipeline
    ds_all = p.datasets()
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>genflow: diffusion vs transformer, measured</title>", f"<style>{CSS}</style></head><body>",
             "<h1>Diffusion vs transformer models, measured</h1>",
             "<p>The seed essay's Table 1, claim by claim, against what this pipeline run measured.</p><ul>"]
    parts += [f"<li>{e(line).replace('`', '')}</li>" for line in _source_lines(report)]
    parts += ["</ul><h2>Summary</h2><table><tr><th>Feature</th><th>Seed essay: diffusion</th>"
              "<th>Seed essay: transformer</th>" + "".join(f"<th>{e(d)}</th>" for d in ds_all)
              + "<th>Verdict</th></tr>"]
    for feature, (cd, ct) in CLAIMS.items():
        tds = []
        for d in ds_all:
            row = next((r for r in report.rows if r.dataset == d and r.feature == feature), None)
            tds.append(_verdict_td(row.verdict, row.evidence) if row else "<td>-</td>")
        v = overall(report.rows, feature)
        parts.append(f"<tr><td>{e(feature)}</td><td>{e(cd)}</td><td>{e(ct)}</td>{''.join(tds)}"
                     f'<td class="{v.replace(" ", "-")}"><b>{e(v)}</b></td></tr>')
    parts.append(f"</table><p>Not measured here: {e(', '.join(NOT_MEASURED_ROWS))}.</p>")
    for ds in ds_all:
        ms = sorted([m for m in p.models if m.dataset == ds], key=lambda m: (m.family != "diffusion", m.key))
        parts.append(f"<h2>{e(ds)}</h2><table><tr><th>Feature</th><th>Claim (diffusion / transformer)</th>"
                     + "".join(f"<th>{e(m.key)} ({e(m.family)})</th>" for m in ms) + "<th>Verdict</th></tr>")
        for r in (r for r in report.rows if r.dataset == ds):
            cd, ct = CLAIMS[r.feature]
            parts.append(f"<tr><td>{e(r.feature)}</td><td>{e(cd)} / {e(ct)}</td>"
                         + "".join(f"<td>{e(r.cells.get(m.key, '-'))}</td>" for m in ms)
                         + _verdict_td(r.verdict, r.evidence) + "</tr>")
        parts.append("</table>")
        if f"sampling_{ds}.png" in report.plots:
            parts.append(_img(report.plots[f"sampling_{ds}.png"], f"{ds}: sampling"))
    for name, title in (("compute.png", "Compute"), ("stability.png", "Stability over seeds")):
        if name in report.plots:
            parts.append(f"<h2>{e(title)}</h2>" + _img(report.plots[name], title))
    parts.append(f"<p><small>Built {e(report.created)} by genflow compare.</small></p></body></html>")
    return "\n".join(parts) + "\n"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def report_json(report: Report) -> dict:
    """The numbers behind the report (compare.json), for scripts."""
    return {"created": report.created, "machine": asdict(report.machine),
            "pipeline": {"run_ids": report.pipeline.run_ids, "flow_run_id": report.pipeline.flow_run_id,
                         "started": report.pipeline.started, "notes": report.pipeline.notes},
            "models": [{"key": m.key, "family": m.family, "backbone": m.backbone, "dataset": m.dataset,
                        "run_id": m.run_id, "note": m.note, "seeds": m.seeds, "seeds_source": m.seeds_source,
                        "scaling": {str(k): v for k, v in m.scaling.items()},
                        "metrics": {k: v for k, v in sorted(m.metrics.items()) if math.isfinite(v)}}
                       for m in report.pipeline.models],
            "rows": [asdict(r) for r in report.rows],
            "summary": {f: overall(report.rows, f) for f in CLAIMS}}


def write_report(report: Report, out_dir: Path) -> Path:
    """Write report.html, report.md, compare.json and the PNGs into out_dir, all at once.

    Everything goes to a temporary folder beside out_dir, which then replaces out_dir: a reader
    sees the old report or the new one, never half of one. Returns out_dir.
    """
    out_dir = Path(out_dir)
    with replaced_dir(out_dir) as tmp:
        for name, png in report.plots.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(report), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report), encoding="utf-8")
        (tmp / "compare.json").write_text(json.dumps(report_json(report), indent=2) + "\n", encoding="utf-8")
    return out_dir
