"""The retrain flow: genflow's main job.

For each dataset in use: ingest -> validate -> prepare (then `dvc commit`).
For each model: train -> evaluate -> export (parity gate) -> register -> promotion gate.
A model whose inputs (DVC hash of its data, its params section, the code version) match a
registered version is skipped: a scheduled run on unchanged data trains nothing.
Afterwards: dvc commit + push, reports/last_run.json, a Prefect markdown artifact, a table.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from components.config import Params, ParamsError, apply_quick, hash_json, load_params
from components.files import write_json


def configure_environment(root: Path) -> None:
    """Local defaults that need no server; set before Prefect or MLflow are imported."""
    root = Path(root).resolve()
    os.environ.setdefault("PREFECT_HOME", str(root / ".genflow" / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The flow runs in this process; its logs must reach the terminal, not only the API.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def quiet_libraries() -> None:
    """Keep the terminal for genflow's own progress lines: libraries speak up only when it matters."""
    import logging

    for name in ("dvc", "great_expectations", "torch.onnx", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_prefect_api() -> None:
    """PREFECT_API_URL pointing nowhere: one clear line before any work starts."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as r:
            r.read()
    except Exception as e:
        raise RuntimeError(f"PREFECT_API_URL={url} does not answer ({e.__class__.__name__}: {e}); "
                           "start the Prefect server or unset PREFECT_API_URL for local mode") from None


# ---------------------------------------------------------------------------
# What a run is about
# ---------------------------------------------------------------------------

def select_models(params: Params, only: Optional[list[str]]) -> list[str]:
    if only:
        for key in only:
            params.model(key)  # raises with the known keys
        return list(only)
    return [k for k, m in params.models.items() if m.enabled]


def check_sources(params: Params, datasets: list[str]) -> None:
    """A source path that is missing: refuse before any work starts."""
    for name in datasets:
        kind, _, value = params.dataset(name).source.partition(":")
        if kind in ("imagefolder", "textfile") and not Path(value).expanduser().exists():
            raise ParamsError(f"datasets.{name}.source: {kind}:{value} does not exist; "
                              "point it at your data with --set datasets.{name}.source={kind}:PATH")
        if kind == "builtin" and value not in ("digits", "pydoc"):
            raise ParamsError(f"datasets.{name}.source: unknown builtin {value!r}; use builtin:digits or builtin:pydoc")
        if kind not in ("builtin", "imagefolder", "textfile"):
            raise ParamsError(f"datasets.{name}.source: unknown kind {kind!r}; "
                              "use builtin:, imagefolder: or textfile:")


def inputs_hash(params: Params, key: str, root: Path) -> str:
    """Everything a model's result depends on: data (DVC hash), its params, the code."""
    from components.versioning import CODE_PATHS, code_version, dataset_hashes

    m = params.model(key)
    family = "mdlm" if m.backbone == "mdlm" else m.family
    return hash_json({
        "data": dataset_hashes(m.dataset, root),
        "model": params.section_hash("models", key),
        "export": params.section_hash("export"),
        "code": code_version(root, CODE_PATHS[family] + ["components/evaluation/images.py",
                                                         "components/evaluation/text.py",
                                                         "components/export.py"]),
    })


@dataclass
class ModelOutcome:
    status: str = "failed"           # trained | skipped | failed
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

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason, "metrics": self.metrics,
                "version": self.version, "aliases": self.aliases,
                "parity_max_abs": self.parity_max_abs, "decision": self.decision,
                "seconds": round(self.seconds, 1)}


def _reportable(metrics: dict) -> dict:
    import math

    return {k: float(v) for k, v in metrics.items()
            if k.split("/")[0] in ("eval", "perf", "baseline", "train")
            and isinstance(v, (int, float)) and math.isfinite(float(v))}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---------------------------------------------------------------------------
# The flow (Prefect is imported lazily so `genflow --help` stays instant)
# ---------------------------------------------------------------------------

def build_flow():
    from prefect import flow, get_run_logger, task
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows import stages

    def step(name: str, retries: int = 0):
        return task(name=name, cache_policy=NO_CACHE, retries=retries,
                    retry_delay_seconds=[2, 8, 30][:max(retries, 1)], log_prints=True,
                    persist_result=False)

    @step("data")
    def data_branch(params: Params, name: str, root: Path) -> dict:
        """ingest -> validate -> prepare -> dvc commit; raises (stops the branch) on bad data."""
        from components.versioning import commit_stages, dataset_hashes

        log = get_run_logger()
        for stage in ("ingest", "validate", "prepare"):
            t0 = time.perf_counter()
            stages.run_stage(params, stage, name, root)
            log.info(f"{stage} {name}: {time.perf_counter() - t0:.1f}s")
        commit_stages(root, [f"ingest@{name}", f"validate@{name}", f"prepare@{name}"])
        return dataset_hashes(name, root)

    @step("train-evaluate-export")
    def model_branch(params: Params, key: str, root: Path, parent_run_id: Optional[str],
                     flow_run_id: Optional[str], force: bool) -> ModelOutcome:
        """Skip when inputs are unchanged; else train, evaluate and export inside a nested MLflow run."""
        from components import registry, tracking

        log = get_run_logger()
        out = ModelOutcome()
        t0 = time.perf_counter()
        out.inputs_hash = ih = inputs_hash(params, key, root)
        kept = None if force else registry.find_version(key, {"genflow.inputs_hash": ih}, root)
        if kept is not None:
            out.status, out.version = "skipped", kept["version"]
            out.metrics, out.aliases = _reportable(kept["metrics"]), kept["aliases"]
            out.parity_max_abs = kept.get("parity_max_abs")
            out.reason = f"inputs unchanged since version {kept['version']}"
            log.info(f"{key}: skipped, {out.reason}")
            out.seconds = time.perf_counter() - t0
            return out
        m = params.model(key)
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
            import mlflow  # the whole exported folder, so `genflow sample` finds model + config in one place

            mlflow.log_artifacts(str(root / "exports" / key), "onnx")
        if not parity["passed"]:
            out.reason = (f"ONNX parity max abs error {parity['max_abs']:.3g} above tolerance "
                          f"{params.export.parity_atol:g}: not registered")
            log.error(f"{key}: {out.reason}")
        else:
            out.status = "exported"
        out.seconds = time.perf_counter() - t0
        return out

    @step("register-promote", retries=3)
    def register_branch(params: Params, key: str, root: Path, out: ModelOutcome) -> ModelOutcome:
        """Talks to the MLflow server: retried with backoff. Registering twice is avoided by
        looking the run's version up first."""
        from components import registry

        log = get_run_logger()
        t0 = time.perf_counter()
        if out.version is None:
            found = registry.find_version(key, {"genflow.inputs_hash": out.inputs_hash}, root)
            out.version = found["version"] if found else registry.register_model(
                key, out.run_id, out.metrics, out.parity, params, root, inputs_hash=out.inputs_hash)
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

    @flow(name="genflow-retrain", log_prints=True, validate_parameters=False,
          task_runner=ThreadPoolTaskRunner(max_workers=4))
    def retrain(params_path: str = "params.yaml", overrides: Optional[list[str]] = None,
                only: Optional[list[str]] = None, quick: bool = False, force: bool = False,
                root: str = ".") -> dict:
        """Validate data, train each model, evaluate, export with a parity gate, register, promote."""
        from prefect.runtime import flow_run

        from components import tracking

        root_p = Path(root).resolve()
        t0 = time.perf_counter()
        params = load_params(root_p / params_path if not Path(params_path).is_absolute() else params_path,
                             overrides or [])
        if quick:
            apply_quick(params)
        keys = select_models(params, only)
        datasets = sorted({params.model(k).dataset for k in keys})
        outcomes: dict[str, ModelOutcome] = {}
        flow_run_id = str(flow_run.get_id() or "")

        data_step = data_branch.with_options(timeout_seconds=params.pipeline.step_timeout_seconds)
        data_ok: dict[str, Any] = {}
        for name in datasets:  # one at a time: cheap, and DVC allows one command per repository
            try:
                data_ok[name] = data_step(params, name, root_p)
            except Exception as e:
                for k in keys:
                    if params.model(k).dataset == name:
                        outcomes[k] = ModelOutcome(status="failed", reason=f"data {name}: {_one_line(e)}")

        runnable = [k for k in keys if params.model(k).dataset in data_ok]
        with tracking.pipeline_run(params, root_p, flow_run_id=flow_run_id, models=runnable,
                                   data_hashes=data_ok) as parent:
            parent_id = parent.info.run_id if parent else None
            timeout = params.pipeline.step_timeout_seconds
            train_step = model_branch.with_options(timeout_seconds=timeout)
            register_step = register_branch.with_options(timeout_seconds=timeout,
                                                         retries=params.pipeline.server_retries)
            pending = list(runnable)
            width = max(1, params.pipeline.max_parallel_models)
            while pending:  # at most `width` models at once; the rest wait their turn
                batch, pending = pending[:width], pending[width:]
                futures = {k: train_step.submit(params, k, root_p, parent_id, flow_run_id, force)
                           for k in batch}
                for k, fut in futures.items():
                    try:
                        out = fut.result()
                        if out.status == "exported":
                            out = register_step(params, k, root_p, out)
                        outcomes[k] = out
                    except Exception as e:
                        outcomes[k] = ModelOutcome(status="failed", reason=_one_line(e))
            summary = finish(params, root_p, keys, outcomes, time.perf_counter() - t0, data_ok)
            if parent is not None:   # None when no model got past its data: nothing was tracked
                tracking.log_summary(summary, root_p)
        if summary["status"] != "completed":   # the Prefect UI shows the run Failed, with the reasons
            from prefect.states import Failed

            return Failed(message=failure_message(summary), data=summary)
        return summary

    return retrain


# ---------------------------------------------------------------------------
# After the models: versioning, reports, the summary people read
# ---------------------------------------------------------------------------

def finish(params: Params, root: Path, keys: list[str], outcomes: dict, seconds: float,
           data_ok: dict) -> dict:
    from components.versioning import VersioningError, commit_stages, push

    notes = []
    ran = [k for k in keys if outcomes.get(k) and outcomes[k].status == "trained"]
    try:
        commit_stages(root, [f"{s}@{k}" for k in ran for s in ("train", "evaluate", "export")])
        if data_ok or ran:
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


HEADLINE = ("eval/fd", "eval/class_acc", "eval/nn_ratio", "eval/bits_per_dim", "eval/bits_per_char")


def summary_table(summary: dict) -> str:
    rows = ["| model | status | version | aliases | headline metrics | parity | note |",
            "|---|---|---|---|---|---|---|"]
    for key, m in summary["models"].items():
        met = m.get("metrics") or {}
        head = ", ".join(f"{k.split('/')[1]} {met[k]:.3g}" for k in HEADLINE if k in met)
        for floor in ("baseline/real_fd", "baseline/kde_fd", "baseline/ngram4_bits_per_char"):
            if floor in met:
                head += f" ({floor.split('/')[1]} {met[floor]:.3g})"
        parity = f"{m['parity_max_abs']:.1e}" if isinstance(m.get("parity_max_abs"), float) else "-"
        note = m.get("reason") or m.get("decision") or ""
        rows.append(f"| {key} | {m['status']} | {m.get('version') or '-'} | "
                    f"{', '.join(m.get('aliases') or []) or '-'} | {head or '-'} | {parity} | {note[:120]} |")
    rows.append(f"\n{summary['status']} in {summary['seconds']:.0f}s")
    return "\n".join(rows)


def write_json_atomic(path: Path, doc: dict) -> None:
    write_json(path, doc, sort_keys=False)


def run_pipeline(params: Params, root: Path, *, only=None, quick=False, force=False,
                 params_path="params.yaml", overrides=None) -> dict:
    """`genflow run`: checks that refuse bad input before any work, then the flow."""
    root = Path(root).resolve()
    keys = select_models(params, only)
    check_sources(params, sorted({params.model(k).dataset for k in keys}))
    from components.versioning import check_remote

    check_remote(root, params.storage.dvc_remote)   # data must reach it after training: check first
    configure_environment(root)
    check_prefect_api()
    from components.tracking import check_tracking, strip_userinfo

    check_tracking(root, params)  # params' tracking_uri too: an absent server stops the run before any work
    retrain = build_flow()
    quiet_libraries()
    # Prefect stores the flow's parameters: no URL credentials in them (check_tracking moved
    # MLflow's to MLFLOW_TRACKING_USERNAME / _PASSWORD already)
    overrides = [strip_userinfo(o) for o in overrides or []]
    started = time.time()
    state = retrain(params_path=str(params_path), overrides=overrides, only=keys,
                    quick=quick, force=force, root=str(root), return_state=True)
    last = root / "reports" / "last_run.json"
    if last.exists() and last.stat().st_mtime >= started - 1:   # written by this run (completed or failed)
        return json.loads(last.read_text())
    try:
        state.result()
    except Exception as e:
        print(f"genflow run: {_one_line(e)}", file=sys.stderr)
        if os.environ.get("GENFLOW_DEBUG"):
            traceback.print_exc()
    return {"status": "failed"}


def serve_schedule(params: Params, root: Path, cron: Optional[str] = None,
                   params_path: str = "params.yaml") -> None:
    """Serve the retrain flow as a deployment with a cron schedule on PREFECT_API_URL's server."""
    cron = cron or params.schedule.cron
    validate_cron(cron)
    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError("genflow schedule needs a Prefect server: start one with "
                           "`prefect server start --host 127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    configure_environment(root)
    check_prefect_api()
    retrain = build_flow()
    print(f"serving genflow-retrain on {os.environ['PREFECT_API_URL']} with cron {cron!r} "
          f"({params.schedule.timezone}); Ctrl-C stops", flush=True)
    retrain.serve(name="nightly-retrain", cron=cron,
                  parameters={"params_path": str(params_path), "root": str(Path(root).resolve())})


def validate_cron(cron: str) -> None:
    from cronsim import CronSim, CronSimError  # what Prefect itself uses to parse cron
    from datetime import datetime

    try:
        CronSim(cron, datetime(2026, 1, 1))
    except CronSimError as e:
        raise ParamsError(f"schedule.cron: {cron!r} is not a valid cron expression ({e}); "
                          "e.g. '0 3 * * *' for 03:00 every day") from None
