"""The retrain flow: genflow's main job.

For each dataset in use: ingest -> validate -> prepare (then `dvc commit`).
For each model: train -> evaluate -> export (parity gate) -> dvc commit + push -> register ->
promotion gate. A model whose inputs (DVC hash of its data, its params section, the code version)
match a registered version is skipped: a scheduled run on unchanged data trains nothing; one whose
registering run died before its gate is registered to the end and gated.
Afterwards: dvc push (when no model pushed before registering), reports/last_run.json, a Prefect
markdown artifact, a table.

The run starts by removing the temporary files a killed run left (components.files.sweep_leftovers).

Prefect reads PREFECT_HOME and its other settings when it is imported, and this module imports
it: the CLI calls `flows.cli.configure_environment` before importing this module.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from components import interrupt, registry, tracking
from components.config import Params, apply_quick, hash_json, load_params
from components.errors import ConfigError, ServerError, disk_full
from components.families.base import backbone
from components.faults import kill_point
from components.files import sweep_leftovers, write_json
from components.project_lock import project_lock
from flows import stages
from flows.preflight import check_prefect_api, preflight, select_models  # noqa: F401  (re-exported)


def quiet_libraries() -> None:
    """Keep the terminal for genflow's own progress lines: libraries speak up only when it matters."""
    import logging

    for name in ("dvc", "great_expectations", "torch.onnx", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    task_log = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, ThreadTimeoutNote) for f in task_log.filters):
        task_log.addFilter(ThreadTimeoutNote())


class ThreadTimeoutNote:
    """Drops Prefect's warning, once per task run, that a timeout in a worker thread cannot interrupt
    blocking calls. Prefect's timeout raises in the thread at its next Python line, and the long
    steps are Python loops of short calls (training steps, evaluation batches), so
    pipeline.step_timeout_seconds does stop them (a single blocking call, a DVC command say, ends
    first); printed on every model of every run, the warning would only alarm people."""

    def filter(self, record) -> bool:
        return "running in a worker thread. Timeouts in worker threads" not in record.getMessage()


def inputs_hash(params: Params, key: str, root: Path) -> str:
    """Everything a model's result depends on: data (DVC hash), its params, the code."""
    from components.versioning import code_version, dataset_hashes

    m = params.model(key)
    return hash_json({
        "data": dataset_hashes(m.dataset, root),
        "model": params.section_hash("models", key),
        "export": params.section_hash("export"),
        "code": code_version(root, backbone(m.backbone, f"models.{key}.backbone").code_paths),
    })


@dataclass
class ModelOutcome:
    status: str = "failed"           # exported (between tasks) | trained | skipped | failed
    reason: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    version: Optional[str] = None
    aliases: list = field(default_factory=list)
    parity_max_abs: Optional[float] = None
    decision: Optional[str] = None
    seconds: float = 0.0
    inputs_hash: str = ""
    run_id: Optional[str] = None
    parity: dict = field(default_factory=dict)
    pushed: bool = False             # its dvc commit + push was tried (before registering)

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason, "metrics": self.metrics,
                "version": self.version, "aliases": self.aliases,
                "parity_max_abs": self.parity_max_abs, "decision": self.decision,
                "seconds": round(self.seconds, 1)}


def _reportable(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if k.split("/")[0] in ("eval", "perf", "baseline", "train")
            and isinstance(v, (int, float)) and math.isfinite(float(v))}


def _one_line(e: BaseException) -> str:
    full = disk_full(e)
    if full:
        return full
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---------------------------------------------------------------------------
# The steps: small Prefect tasks, each calling flows/stages.py
# ---------------------------------------------------------------------------

# Never cached (the registry decides what is unchanged) and nothing persisted: results stay in memory.
_STEP = dict(cache_policy=NO_CACHE, log_prints=True, persist_result=False)


@task(name="data", retries=0, retry_delay_seconds=[2], **_STEP)
def prepare_data(params: Params, name: str, root: Path) -> dict:
    """ingest -> validate -> prepare -> dvc commit; returns the dataset's DVC hashes. Raises on bad data."""
    from components.versioning import commit_stages, dataset_hashes

    log = get_run_logger()
    for stage in stages.DATASET_STAGES:
        t0 = time.perf_counter()
        stages.run_stage(params, stage, name, root)
        log.info(f"{stage} {name}: {time.perf_counter() - t0:.1f}s")
    commit_stages(root, [f"{stage}@{name}" for stage in stages.DATASET_STAGES])
    return dataset_hashes(name, root)


@task(name="train-evaluate-export", retries=0, retry_delay_seconds=[2], **_STEP)
def train_evaluate_export(params: Params, key: str, root: Path, parent_run_id: Optional[str],
                          flow_run_id: Optional[str], force: bool) -> ModelOutcome:
    """Skip when a registered version has the same inputs; else train, evaluate and export in a
    nested MLflow run. status "exported" means: passed the parity gate, ready to register."""
    t0 = time.perf_counter()
    ih = inputs_hash(params, key, root)
    kept = None if force else registry.find_version(key, {"genflow.inputs_hash": ih}, root)
    if kept is not None and kept["pending"]:   # registered by a run that died before its gate
        out = ModelOutcome(status="exported", version=kept["version"], run_id=kept["run_id"],
                           metrics=_reportable(kept["metrics"]), parity=kept["parity"],
                           parity_max_abs=kept.get("parity_max_abs"))
        get_run_logger().info(f"{key}: version {kept['version']} was registered by an interrupted run; "
                              "finishing its registration and gate")
    elif kept is not None:
        out = _unchanged(kept)
        get_run_logger().info(f"{key}: skipped, {out.reason}")
    else:
        out = _train_in_mlflow_run(params, key, root, ih, parent_run_id, flow_run_id)
    out.inputs_hash, out.seconds = ih, time.perf_counter() - t0
    return out


def _unchanged(kept: dict) -> ModelOutcome:
    """The outcome of a model skipped because registered version `kept` has the same inputs."""
    return ModelOutcome(status="skipped", version=kept["version"], metrics=_reportable(kept["metrics"]),
                        aliases=kept["aliases"], parity_max_abs=kept.get("parity_max_abs"),
                        reason=f"inputs unchanged since version {kept['version']}")


def _train_in_mlflow_run(params: Params, key: str, root: Path, ih: str, parent_run_id: Optional[str],
                         flow_run_id: Optional[str]) -> ModelOutcome:
    import mlflow

    log = get_run_logger()
    m = params.model(key)
    out = ModelOutcome()
    with tracking.model_run(key, params, root, parent_run_id=parent_run_id,
                            flow_run_id=flow_run_id, extra_tags={"genflow.inputs_hash": ih}) as run:
        out.run_id = run.info.run_id
        log.info(f"{key}: training ({m.family}/{m.backbone} on {m.dataset}, "
                 f"budget {m.train.max_seconds:.0f}s / {m.train.max_steps} steps)")
        metrics = dict(stages.run_stage(params, "train", key, root))
        log.info(f"{key}: evaluating")
        metrics.update(stages.run_stage(params, "evaluate", key, root))
        out.metrics = _reportable(metrics)
        tracking.log_metrics(out.metrics)
        tracking.log_model_artifacts(key, root)
        log.info(f"{key}: exporting to ONNX")
        out.parity = parity = stages.run_stage(params, "export", key, root)
        out.parity_max_abs = float(parity["max_abs"])
        tracking.log_parity(key, parity, root)
        # the whole exported folder, so `genflow sample` finds model + config in one place
        mlflow.log_artifacts(str(root / "exports" / key), "onnx")
    if not parity["passed"]:
        out.reason = (f"ONNX parity max abs error {parity['max_abs']:.3g} above tolerance "
                      f"{params.export.parity_atol:g}: not registered")
        log.error(f"{key}: {out.reason}")
    else:
        out.status = "exported"
    return out


@task(name="register-promote", retries=3, retry_delay_seconds=[2, 8, 30], **_STEP)
def register_promote(params: Params, key: str, root: Path, out: ModelOutcome) -> ModelOutcome:
    """Talks to the MLflow server: retried with backoff. Registering twice is avoided by
    looking the run's version up first."""
    log = get_run_logger()
    t0 = time.perf_counter()
    if out.version is None:
        found = registry.find_version(key, {"genflow.inputs_hash": out.inputs_hash}, root)
        out.version = found["version"] if found else registry.register_model(
            key, out.run_id, out.metrics, out.parity, params, root, inputs_hash=out.inputs_hash)
    registry.complete_registration(registry.registry_client(root, params), key, out.version, root, params=params)
    kill_point("gate")   # registered, not yet gated: the rerun gates it
    theirs = None
    champion_run = registry.stale_champion(key, out.version, root)
    if champion_run:   # new data: measure the champion on it too, so the gate compares like with like
        log.info(f"{key}: the evaluation data changed since the champion was measured; re-evaluating it")
        try:
            theirs = stages.evaluate_registered(params, key, champion_run, root)
        except Exception as e:   # the gate then refuses to compare and says why
            log.warning(f"{key}: could not re-evaluate the champion (run {champion_run}): {_one_line(e)}")
    decision = registry.gate(key, out.version, params, root, champion_metrics_on_new_data=theirs)
    out.decision = decision.reason
    out.aliases = registry.aliases_of(key, out.version, root)
    out.status = "trained"
    out.seconds += time.perf_counter() - t0
    log.info(f"{key}: version {out.version} "
             f"{'promoted to champion' if decision.promoted else 'kept as challenger'} ({decision.reason})")
    return out


# ---------------------------------------------------------------------------
# The flow: reads as the DAG
# ---------------------------------------------------------------------------

@flow(name="genflow-retrain", log_prints=True, validate_parameters=False,
      task_runner=ThreadPoolTaskRunner(max_workers=4))
def retrain(params_path: str = "params.yaml", overrides: Optional[list[str]] = None,
            only: Optional[list[str]] = None, quick: bool = False, force: bool = False,
            root: str = ".") -> dict:
    """Validate data, train each model, evaluate, export with a parity gate, register, promote.

    Returns the run summary (what reports/last_run.json holds); when a model failed, a Failed
    state whose message names every failure and whose result is that summary."""
    root_p = Path(root).resolve()
    # `genflow run` holds the project's lock already; a scheduled run takes it here, waiting its turn
    with project_lock(root_p, "genflow-retrain flow (scheduled)", wait=True, on_wait=print):
        return _retrain(params_path, overrides, only, quick, force, root_p)


def _retrain(params_path: str, overrides: Optional[list[str]], only: Optional[list[str]], quick: bool,
             force: bool, root_p: Path):
    t0 = time.perf_counter()
    for line in sweep_leftovers(root_p):   # we hold the project: temporary files are a killed run's
        print(f"left by an interrupted run: {line}", flush=True)
    params = load_params(root_p / params_path, overrides or [])   # an absolute params_path stays as is
    if quick:
        apply_quick(params)
    keys = select_models(params, only)
    flow_run_id = str(flow_run.get_id() or "")

    data_hashes, outcomes = prepare_datasets(params, keys, root_p)
    runnable = [k for k in keys if params.model(k).dataset in data_hashes]
    with tracking.pipeline_run(params, root_p, flow_run_id=flow_run_id, models=runnable,
                               data_hashes=data_hashes) as parent:
        parent_id = parent.info.run_id if parent else None
        outcomes.update(train_and_register(params, runnable, root_p, parent_id, flow_run_id, force))
        summary = finish(params, root_p, keys, outcomes, time.perf_counter() - t0, data_hashes)
        if parent is not None:   # None when no model got past its data: nothing was tracked
            tracking.log_summary(summary, root_p)
    if summary["status"] != "completed":   # the Prefect UI shows the run Failed, with the reasons
        return Failed(message=failure_message(summary), data=summary)
    return summary


def prepare_datasets(params: Params, keys: list[str], root: Path) -> tuple[dict, dict]:
    """The data step for each dataset the models use, one at a time (cheap, and DVC allows one
    command per repository). Returns (DVC hashes of each dataset that passed, a failed outcome for
    each model whose dataset did not): bad data stops only its own models."""
    step = prepare_data.with_options(timeout_seconds=params.pipeline.step_timeout_seconds)
    hashes: dict[str, dict] = {}
    failed: dict[str, ModelOutcome] = {}
    for name in sorted({params.model(k).dataset for k in keys}):
        try:
            hashes[name] = step(params, name, root)
        except Exception as e:
            failed.update({k: ModelOutcome(status="failed", reason=f"data {name}: {_one_line(e)}")
                           for k in keys if params.model(k).dataset == name})
    return hashes, failed


def train_and_register(params: Params, keys: list[str], root: Path, parent_run_id: Optional[str],
                       flow_run_id: str, force: bool) -> dict[str, ModelOutcome]:
    """Train, evaluate and export `pipeline.max_parallel_models` models at a time; register and gate
    each that passed its parity gate. A model that fails is a failed outcome, never a stopped run."""
    timeout = params.pipeline.step_timeout_seconds
    train = train_evaluate_export.with_options(timeout_seconds=timeout)
    register = register_promote.with_options(timeout_seconds=timeout, retries=params.pipeline.server_retries)
    width = max(1, params.pipeline.max_parallel_models)
    outcomes: dict[str, ModelOutcome] = {}
    for start in range(0, len(keys), width):   # at most `width` models at once; the rest wait their turn
        futures = {k: train.submit(params, k, root, parent_run_id, flow_run_id, force)
                   for k in keys[start:start + width]}
        for k, fut in futures.items():
            out = ModelOutcome()
            try:
                out = fut.result()
                if out.status == "exported":
                    out.pushed = True
                    save_outputs(params, k, root)   # its data and files reach the DVC remote first
                    out = register(params, k, root, out)
                outcomes[k] = out
            except Exception as e:
                outcomes[k] = ModelOutcome(status="failed", reason=_one_line(e), pushed=out.pushed)
    return outcomes


def save_outputs(params: Params, key: str, root: Path) -> None:
    """dvc commit of the model's stages and dvc push, before it is registered: a version is never
    registered whose data and files did not reach the remote (a full disk, say)."""
    from components.versioning import commit_stages, push

    commit_stages(root, [f"{s}@{key}" for s in stages.MODEL_STAGES])
    push(root, params.storage.dvc_remote)


# ---------------------------------------------------------------------------
# After the models: versioning, reports, the summary people read
# ---------------------------------------------------------------------------

def finish(params: Params, root: Path, keys: list[str], outcomes: dict, seconds: float,
           data_ok: dict) -> dict:
    from components.versioning import VersioningError, push

    notes = []
    try:   # a model that got past its export pushed everything already (save_outputs), or failed to
        if data_ok and not any(o.pushed for o in outcomes.values()):
            push(root, params.storage.dvc_remote)
    except VersioningError as e:
        notes.append(str(e))
    failed = [k for k in keys if outcomes.get(k) is None or outcomes[k].status == "failed"]
    summary = {
        "status": "failed" if failed or notes else "completed",
        "seconds": round(seconds, 1),
        "models": {k: (outcomes.get(k) or ModelOutcome(reason="not run")).to_json() for k in keys},
        "notes": notes,
    }
    write_json_atomic(root / "reports" / "last_run.json", summary)
    table = summary_table(summary)
    print(table)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=table, key="retrain-summary", description="genflow run summary")
    except Exception:  # an artifact is a nicety; the table is printed and written anyway
        pass
    return summary


def failure_message(summary: dict) -> str:
    """'pydoc-gpt: data pydoc: ...; dvc push ...': every failure and its reason, on one line."""
    parts = [f"{k}: {m.get('reason') or m.get('status')}" for k, m in summary.get("models", {}).items()
             if m.get("status") == "failed"]
    parts += list(summary.get("notes", []))
    return "; ".join(parts)[:2000] or "failed"


HEADLINE = ("eval/fd", "eval/class_acc", "eval/nn_ratio", "eval/bits_per_dim", "eval/bits_per_char",
            "eval/sr_psnr", "eval/sr_class_acc", "eval/sr_fd")


def summary_table(summary: dict) -> str:
    rows = ["| model | status | version | aliases | headline metrics | MFU | parity | note |",
            "|---|---|---|---|---|---|---|---|"]
    for key, m in summary["models"].items():
        met = m.get("metrics") or {}
        head = ", ".join(f"{k.split('/')[1]} {met[k]:.3g}" for k in HEADLINE if k in met)
        for floor in ("baseline/real_fd", "baseline/kde_fd", "baseline/ngram4_bits_per_char", "baseline/bicubic_psnr"):
            if floor in met:
                head += f" ({floor.split('/')[1]} {met[floor]:.3g})"
        parity = f"{m['parity_max_abs']:.1e}" if isinstance(m.get("parity_max_abs"), float) else "-"
        # achieved training FLOP/s over the measured matmul peak (a skipped model: its kept version's)
        mfu = f"{met['perf/mfu']:.1%}" if "perf/mfu" in met else "-"
        note = m.get("reason") or m.get("decision") or ""
        rows.append(f"| {key} | {m['status']} | {m.get('version') or '-'} | "
                    f"{', '.join(m.get('aliases') or []) or '-'} | {head or '-'} | {mfu} | {parity} | {note[:120]} |")
    rows.append(f"\n{summary['status']} in {summary['seconds']:.0f}s")
    return "\n".join(rows)


def write_json_atomic(path: Path, doc: dict) -> None:
    write_json(path, doc, sort_keys=False)


def run_pipeline(params: Params, root: Path, *, only=None, quick=False, force=False,
                 params_path="params.yaml", overrides=None, checked: bool = False) -> dict:
    """`genflow run`: checks that refuse bad input before any work (flows/preflight.py; skipped with
    checked=True when the caller ran them and passes their model keys as `only`), then the flow;
    returns its summary.

    A model that failed is in the summary (status "failed"); an error of the run itself (a tracking
    server lost mid-run, a bug) is raised, for the caller to report."""
    root = Path(root).resolve()
    keys = only if checked else preflight(params, root, only)
    quiet_libraries()
    if not os.environ.get("PREFECT_API_URL"):
        interrupt.on_stop(_give_up_on_the_local_server)
    # Prefect stores the flow's parameters: no URL credentials in them (check_tracking moved
    # MLflow's to MLFLOW_TRACKING_USERNAME / _PASSWORD already)
    overrides = [tracking.strip_userinfo(o) for o in overrides or []]
    state = retrain(params_path=str(params_path), overrides=overrides, only=keys,
                    quick=quick, force=force, root=str(root), return_state=True)
    summary = state.result(raise_on_failure=False)   # Completed or Failed: the summary; Crashed: the error
    if isinstance(summary, BaseException):
        raise summary
    return summary


def _give_up_on_the_local_server() -> None:
    """Ctrl-C reaches the temporary Prefect server too (same process group) and it shuts down: the
    flow's last state updates must not retry against it (5 retries with back-off: ~70 s)."""
    from prefect.settings import get_current_settings

    get_current_settings().client.max_retries = 0


def serve_schedule(params: Params, root: Path, cron: Optional[str] = None,
                   params_path: str = "params.yaml") -> None:
    """Serve the retrain flow as a deployment with a cron schedule on PREFECT_API_URL's server."""
    cron = cron or params.schedule.cron
    validate_cron(cron)
    if not os.environ.get("PREFECT_API_URL"):
        raise ServerError("genflow schedule needs a Prefect server: start one with "
                          "`prefect server start --host 127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    check_prefect_api()
    print(f"serving genflow-retrain on {os.environ['PREFECT_API_URL']} with cron {cron!r} "
          f"({params.schedule.timezone}); Ctrl-C stops", flush=True)
    retrain.serve(name="nightly-retrain", cron=cron,
                  parameters={"params_path": str(params_path), "root": str(Path(root).resolve())})


def validate_cron(cron: str) -> None:
    from datetime import datetime

    from cronsim import CronSim, CronSimError  # what Prefect itself uses to parse cron

    try:
        CronSim(cron, datetime(2026, 1, 1))
    except CronSimError as e:
        raise ConfigError(f"schedule.cron: {cron!r} is not a valid cron expression ({e}); "
                          "e.g. '0 3 * * *' for 03:00 every day") from None
