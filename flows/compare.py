"""`genflow compare`: the seed essay's Table 1, measured on the models of one pipeline run.

    build_report(params, root)                     # the latest pipeline run -> reports/compare/report.html
    build_report(params, root, run_id="ab12...")   # a given pipeline (parent) run
    build_report(params, root, seeds=3)            # also retrain every model with seeds 0, 1, 2 (quick budget)

Steps: read the run's models from MLflow (components.compare.collect), measure this machine's
matmul peak, time a few training steps of each model at 1 and 2 threads, gather the spread over
seeds, build the rows and plots, write reports/compare/ atomically and log it as an artifact
(compare/) of the pipeline's parent run(s).
"""
from __future__ import annotations

import copy
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from components.config import Params, apply_quick
from components.families.registry import backbone

PROBE_BUDGET_S = 2.0        # seconds of timed training steps per model and thread count
PROBE_THREADS = (1, 2)
SEED_MIN_STEPS = 10         # --seeds: at least this many training steps per seed
SEED_TIME_CAP = 10          # --seeds: a seed's run may take this many times the quick time budget


def _say(msg: str) -> None:
    print(f"compare: {msg}", flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_machine():
    """Cores, CPU name and the fp32 matmul peak on all cores and on one."""
    import torch

    from components.compare import Machine
    from components.resources import matmul_peak_gflops

    cores = os.cpu_count() or 1
    peak = matmul_peak_gflops(cores)
    one = matmul_peak_gflops(1) if cores > 1 else peak
    return Machine(cores=cores, cpu=_cpu_name(), peak_gflops=peak, peak_gflops_1thread=one,
                   torch=torch.__version__)


def load_run_model(client, m, root: Path):
    """(network, config) of a model run: its logged checkpoint, else models/<key>/model.pt if it is the same size.

    Raises ConfigError for a backbone this genflow no longer knows (an old run), FileNotFoundError without weights.
    """
    fam = backbone(m.backbone, f"run {m.run_id} ({m.key})").family()
    with tempfile.TemporaryDirectory(prefix="genflow-compare-") as tmp:
        dest = Path(tmp) / "models" / m.key
        dest.mkdir(parents=True)
        try:
            client.download_artifacts(m.run_id, "checkpoint/model.pt", str(dest.parent))
            shutil.move(str(dest.parent / "checkpoint" / "model.pt"), dest / "model.pt")
            return fam.load_model(m.key, Path(tmp))
        except Exception:
            pass
    net, config = fam.load_model(m.key, root)  # raises when absent
    if sum(p.numel() for p in net.parameters()) != int(m.metrics["perf/params"]):
        raise FileNotFoundError(f"models/{m.key}/model.pt is another model than run {m.run_id}")
    return net, config


def probe_scaling(client, m, root: Path, budget_s: float = PROBE_BUDGET_S) -> dict[int, float]:
    """Training items/s of the run's network at 1 and 2 threads; {} when the weights cannot be found."""
    from components.families.base import probe_train_step
    from components.resources import thread_scaling

    try:
        net, config = load_run_model(client, m, root)
    except Exception as e:
        _say(f"{m.key}: thread scaling not probed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return {}
    batch = int(m.param("train.batch_size", 32))
    step, items = probe_train_step(net, config, batch)
    return thread_scaling(step, items, PROBE_THREADS, budget_s=budget_s)


def seed_steps(m, quick) -> int:
    """Training steps for each seed: what the quick time budget buys at the run's own step rate.

    Every seed trains exactly this many steps (time no longer binds), so the spread over seeds
    comes from the seeds, not from how busy the machine was during each one.
    """
    steps, seconds = m.metrics.get("perf/train_steps", 0.0), m.metrics.get("perf/train_seconds", 0.0)
    if steps <= 0 or seconds <= 0:
        return quick.max_steps
    return int(min(quick.max_steps, max(SEED_MIN_STEPS, round(quick.max_seconds * steps / seconds))))


def retrain_seeds(params: Params, root: Path, models, n: int) -> None:
    """Retrain each model with train.seed 0..n-1 at the quick budget in a temporary root; fills m.seeds.

    The budget is a number of steps (see seed_steps), the same for every seed; a time cap of
    SEED_TIME_CAP x the quick budget stops a run that cannot finish.
    """
    q = apply_quick(copy.deepcopy(params))
    with tempfile.TemporaryDirectory(prefix="genflow-seeds-") as tmp:
        tmp_root = Path(tmp)
        for ds in sorted({m.dataset for m in models}):
            src = root / "data" / "prepared" / ds
            if not src.is_dir():
                from components.compare import CompareError

                raise CompareError(f"data/prepared/{ds}: not found; --seeds retrains on the prepared data, "
                                   f"run `genflow run` (or `genflow stage prepare {ds}`) first")
            shutil.copytree(src, tmp_root / "data" / "prepared" / ds)
        cache = root / ".genflow" / "cache"
        if cache.is_dir():  # the reference networks of the image metrics: no need to fit them again
            shutil.copytree(cache, tmp_root / ".genflow" / "cache")
        for m in models:
            if m.key not in q.models:
                _say(f"{m.key}: not in params.yaml; spread over seeds not measured")
                continue
            fam = backbone(q.model(m.key).backbone, f"models.{m.key}.backbone").family()
            tc = q.model(m.key).train
            tc.max_steps = seed_steps(m, q.pipeline.quick)
            tc.max_seconds = q.pipeline.quick.max_seconds * SEED_TIME_CAP
            tc.warmup_steps = min(tc.warmup_steps, tc.max_steps // 10)
            tc.checkpoint_every = min(tc.checkpoint_every, tc.max_steps)
            runs = []
            for seed in range(n):
                tc.seed = seed
                shutil.rmtree(tmp_root / "models" / m.key, ignore_errors=True)  # never resume another seed
                t0 = time.perf_counter()
                trained = fam.train(m.key, q, tmp_root)
                scored = fam.evaluate(m.key, q, tmp_root)
                runs.append({"seed": float(seed), "train/loss": float(trained["train/loss"]),
                             m.main_metric: float(scored[m.main_metric]),
                             "steps": float(trained.get("perf/train_steps", tc.max_steps))})
                _say(f"{m.key} seed {seed}: loss {trained['train/loss']:.4g}, {m.main_metric} "
                     f"{scored[m.main_metric]:.4g} ({time.perf_counter() - t0:.0f}s)")
            m.seeds, m.seeds_source = runs, "retrained"


def build_report(params: Params, root: Path, run_id: Optional[str] = None, seeds: Optional[int] = None, *,
                 probe: bool = True, probe_budget_s: float = PROBE_BUDGET_S) -> Path:
    """Build reports/compare/ (report.html, report.md, compare.json, PNGs) and log it on the parent run(s).

    run_id: a pipeline (parent) run id, or a model run's id (its parent is used); default the latest.
    seeds: retrain every model with seeds 0..seeds-1 at params.pipeline.quick's budget and report
    mean ± std; without it, runs of the same model that differ only in train.seed are used.
    probe: time a few training steps at 1 and 2 threads (off in tests). Returns report.html's path.
    Raises CompareError (a GenflowError and ValueError) with one line when the run cannot be compared.
    """
    import mlflow

    from components import compare, tracking

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if seeds is not None and seeds < 1:
        raise compare.CompareError(f"--seeds {seeds}: give a number of seeds of at least 1, e.g. --seeds 3")
    root = Path(root).resolve()
    uri = tracking.check_tracking(root, params)
    client = mlflow.MlflowClient(uri)
    pipeline = compare.collect(client, params.tracking.experiment_prefix, run_id)
    _say(f"pipeline run of {pipeline.started}: {', '.join(m.key for m in pipeline.models)}")

    _say("measuring the fp32 matmul peak")
    machine = measure_machine()
    if probe:
        for m in pipeline.models:
            _say(f"{m.key}: timing training steps at {' and '.join(map(str, PROBE_THREADS))} threads")
            m.scaling = probe_scaling(client, m, root, probe_budget_s)
    if seeds:
        _say(f"retraining {len(pipeline.models)} models with {seeds} seeds at the quick budget")
        retrain_seeds(params, root, pipeline.models, seeds)
    for m in pipeline.models:
        if not m.seeds:
            m.seeds, m.seeds_source = compare.seed_history(client, m), "mlflow"

    report = compare.make_report(pipeline, machine)
    out = compare.write_report(report, root / "reports" / "compare")
    for rid in pipeline.run_ids.values():
        try:
            client.log_artifacts(rid, str(out), "compare")
        except Exception as e:  # the report on disk stands; say why MLflow lacks it
            print(f"warning: could not log the report on run {rid}: {type(e).__name__}: {e}", file=sys.stderr)
    return out / "report.html"
