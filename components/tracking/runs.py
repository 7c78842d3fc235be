"""MLflow runs: one parent run per pipeline run, one nested run per model, and what they log.

How a pipeline run looks in MLflow::

    experiment  <tracking.experiment_prefix>-<dataset>     one per dataset, e.g. genflow-digits
      run       pipeline 2026-11-27 03:00:00             one per `genflow run` (per dataset it touches)
        run     digits-unet                              nested, one per model: params, metrics,
                                                         artifacts, the ONNX model it registered

Every run carries lineage tags ``genflow.*`` (see `lineage.lineage_tags`). MLflow is imported
inside the functions.
"""
from __future__ import annotations

import contextvars
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import yaml

from components.config import Params
from components.layout import Layout
from components.tracking.lineage import (
    data_hash_tags,
    lineage_tags,
    local_data_hashes,
    model_params,
    pipeline_params,
    placement_tags,
)
from components.tracking.uri import TrackingError, check_tracking, ensure_experiment, experiment_name

MAX_TAG_CHARS = 8000         # MLflow refuses longer run tag values
PARAMS_ARTIFACT = "lineage/params.yaml"

# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------

@dataclass
class PipelineRun:
    """The parent run(s) of one pipeline run: one per dataset experiment it touches.

    `info.run_id` is the first one; `model_run(parent_run_id=...)` finds the parent that lives
    in the model's own experiment, so the MLflow UI shows each model under its pipeline run.
    """
    run_ids: dict[str, str]
    info: SimpleNamespace
    status: str = "FINISHED"
    uri: str = ""


_CURRENT_PIPELINE: contextvars.ContextVar[Optional[PipelineRun]] = contextvars.ContextVar(
    "genflow_pipeline_run", default=None)


@contextmanager
def pipeline_run(params: Params, root: Path, flow_run_id: Optional[str] = None, *,
                 models: Optional[list[str]] = None,
                 data_hashes: Optional[Mapping[str, Any]] = None) -> Iterator[Optional[PipelineRun]]:
    """Parent run of a pipeline run; yields a `PipelineRun` (None when no model is to run).

    models: the model keys of this run (default: the enabled ones). The runs end FINISHED,
    or FAILED when the block raises or `log_summary` reported a failed run.
    """
    import mlflow

    keys = list(models) if models is not None else [k for k, m in params.models.items() if m.enabled]
    datasets = sorted({params.model(k).dataset for k in keys})
    if not datasets:
        yield None
        return
    uri = check_tracking(root, params)
    client = mlflow.MlflowClient(uri)
    tags = lineage_tags(root, params, None, data_hashes, flow_run_id)
    tags.update({"genflow.kind": "pipeline", "genflow.models": ",".join(keys)[:MAX_TAG_CHARS]})
    name = f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run_ids = {}
    for ds in datasets:
        exp_id = ensure_experiment(client, experiment_name(params, ds), uri, root)
        run_ids[ds] = client.create_run(exp_id, tags=tags, run_name=name).info.run_id
    from mlflow.entities import Param, RunTag

    plist = [Param(k, v) for k, v in pipeline_params(params, keys).items()]
    for rid in run_ids.values():
        client.log_batch(rid, params=plist, tags=[RunTag("genflow.pipeline_runs", json.dumps(run_ids))])
    state = PipelineRun(run_ids=run_ids, info=SimpleNamespace(run_id=run_ids[datasets[0]]), uri=uri)
    token = _CURRENT_PIPELINE.set(state)
    try:
        yield state
    except BaseException as e:
        state.status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        _CURRENT_PIPELINE.reset(token)
        for rid in run_ids.values():
            try:
                client.set_terminated(rid, state.status)
            except Exception as e:  # never hide the block's own error behind a bookkeeping one
                print(f"warning: could not close MLflow run {rid}: {e}")


def _parent_in_experiment(client: Any, parent_run_id: Optional[str], experiment_id: str,
                          dataset: str) -> tuple[Optional[str], dict[str, str]]:
    """The pipeline run in the model's own experiment, and that run's tags."""
    if not parent_run_id:
        return None, {}
    parent = client.get_run(parent_run_id)
    if parent.info.experiment_id != experiment_id:
        siblings = json.loads(parent.data.tags.get("genflow.pipeline_runs", "{}"))
        if siblings.get(dataset):
            parent = client.get_run(siblings[dataset])
    return parent.info.run_id, dict(parent.data.tags)


@contextmanager
def model_run(key: str, params: Params, root: Path, parent_run_id: Optional[str] = None, *,
              flow_run_id: Optional[str] = None, data_hashes: Optional[Mapping[str, Any]] = None,
              extra_tags: Optional[Mapping[str, str]] = None) -> Iterator[Any]:
    """Nested run named after the model key; yields MLflow's ActiveRun (active in this thread).

    Logs the model's flattened params, lineage tags and its data as MLflow dataset inputs
    (`datasets.log_data_inputs`: digest = the DVC hash). Data hashes and the flow-run id default
    to those of the parent pipeline run; data hashes else to dvc.lock, else to the prepared
    manifest. Inside the block, `log_metrics` and the training loop log to this run.
    """
    import mlflow

    m = params.model(key)
    uri = check_tracking(root, params)
    client = mlflow.MlflowClient(uri)
    exp_id = ensure_experiment(client, experiment_name(params, m.dataset), uri, root)
    parent_id, parent_tags = _parent_in_experiment(client, parent_run_id, exp_id, m.dataset)
    base = f"genflow.data_hash.{m.dataset}"
    hash_tags = {k: v for k, v in parent_tags.items() if k == base or k.startswith(base + ".")}
    if data_hashes is not None or not hash_tags:
        hash_tags = data_hash_tags(data_hashes if data_hashes is not None
                                   else local_data_hashes(m.dataset, root))
    tags = lineage_tags(root, params, key, None, flow_run_id or parent_tags.get("genflow.flow_run_id"))
    tags.update(hash_tags)
    tags["genflow.eval_data_hash"] = hash_tags.get(base, "unknown")
    tags.update(extra_tags or {})
    active = mlflow.active_run()
    nested = active is not None and active.info.run_id == parent_id
    with mlflow.start_run(experiment_id=exp_id, run_name=key, parent_run_id=parent_id,
                          nested=nested, tags=tags) as run:
        mlflow.log_params({**model_params(params, key), **prepared_image_params(m.dataset, root)})
        mlflow.log_text(yaml.safe_dump(run_params(params, key), sort_keys=False), PARAMS_ARTIFACT)
        from components.tracking.datasets import log_data_inputs

        log_data_inputs(m.dataset, hash_tags.get(base), root, params.storage.dvc_remote,
                        hash_tags.get(f"{base}.raw", ""))
        yield run


def prepared_image_params(dataset: str, root: Path) -> dict[str, str]:
    """What prepare found of an image dataset, where params leave it open: dataset.channels (1 or 3, the
    files' own when params say none) and dataset.labelled (false for a folder without classes)."""
    from components.data import load_manifest, manifest_channels, manifest_labelled

    try:
        manifest = load_manifest(dataset, root)
    except Exception:   # not prepared here (a run logged from elsewhere): params say what they say
        return {}
    if "image_size" not in manifest:
        return {}
    return {"dataset.channels": str(manifest_channels(manifest)),
            "dataset.labelled": str(manifest_labelled(manifest)).lower()}


def run_params(params: Params, key: str) -> dict:
    """The params a model run used, as a loadable params.yaml (overrides and --quick applied):
    its model, its dataset and the shared sections; never the tracking URI or storage settings,
    which may carry credentials and do not change the model."""
    raw = params.to_dict()
    m = params.model(key)
    raw["models"] = {key: raw["models"][key]}
    raw["datasets"] = {m.dataset: raw["datasets"][m.dataset]}
    raw.pop("tracking", None)
    raw.pop("storage", None)
    return raw


# ---------------------------------------------------------------------------
# Logging helpers (the active run, or an explicit run_id)
# ---------------------------------------------------------------------------

def _run_id(run_id: Optional[str]) -> str:
    import mlflow

    if run_id:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise TrackingError("no active MLflow run: log inside `with model_run(...)` or pass run_id=")
    return active.info.run_id


def log_metrics(metrics: Mapping[str, Any], step: Optional[int] = None, run_id: Optional[str] = None) -> int:
    """Log the numeric entries of `metrics` (others are skipped); returns how many were logged."""
    import mlflow
    from mlflow.entities import Metric

    rid = _run_id(run_id)
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if batch:
        mlflow.MlflowClient().log_batch(rid, metrics=batch)
    return len(batch)


def log_files(paths: Iterable[Union[str, Path]], artifact_path: Optional[str] = None,
              run_id: Optional[str] = None) -> list[str]:
    """Log files or folders that exist as artifacts; returns the artifact paths written."""
    import mlflow

    rid, client, logged = _run_id(run_id), mlflow.MlflowClient(), []
    for p in map(Path, paths):
        if p.is_dir():
            client.log_artifacts(rid, str(p), artifact_path)
        elif p.is_file():
            client.log_artifact(rid, str(p), artifact_path)
        else:
            continue
        logged.append(f"{artifact_path}/{p.name}" if artifact_path else p.name)
    return logged


def log_model_artifacts(key: str, root: Path, params: Optional[Params] = None,
                        run_id: Optional[str] = None) -> list[str]:
    """Log what a model run produced, from the shared layout, as run artifacts:

    reports/<key>/ (samples.png, samples.txt, metrics.json, tables) -> reports/
    data/validation/<dataset>.json                                  -> validation/
    exports/<key>/parity.json                                       -> export/
    models/<key>/model.pt, train_metrics.json, schedule.json        -> checkpoint/
    Missing files are skipped. Returns the artifact paths written.
    """
    import mlflow

    lay = Layout(root)
    rid = _run_id(run_id)
    dataset = params.model(key).dataset if params is not None else \
        mlflow.MlflowClient().get_run(rid).data.tags.get("genflow.dataset")
    logged = []
    reports = lay.report_dir(key)
    if reports.is_dir():
        logged += log_files(sorted(reports.iterdir()), "reports", rid)
    if dataset:
        logged += log_files([lay.validation_file(dataset)], "validation", rid)
    logged += log_files([lay.export_dir(key) / "parity.json"], "export", rid)
    model_dir = lay.model_dir(key)
    logged += log_files([model_dir / "model.pt", model_dir / "train_metrics.json", model_dir / "schedule.json"],
                        "checkpoint", rid)
    try:  # how training ran: what `genflow reproduce` must repeat
        schedule = json.loads((model_dir / "schedule.json").read_text())
        mlflow.MlflowClient().set_tag(rid, "genflow.train_threads", str(schedule["threads"]))
        mlflow.MlflowClient().set_tag(rid, "genflow.train_steps", str(schedule["steps"]))
        if schedule.get("policy"):   # how the threads were chosen (components/threads.py)
            mlflow.MlflowClient().set_tag(rid, "genflow.thread_policy", str(schedule["policy"])[:500])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for tag, value in placement_tags(model_dir / "schedule.json").items():   # genflow.device, genflow.precision
        mlflow.MlflowClient().set_tag(rid, tag, value)
    return logged


def log_parity(key: str, parity: Mapping[str, Any], root: Path, run_id: Optional[str] = None) -> None:
    """The ONNX parity result: export/parity.json plus tags genflow.parity_max_abs / genflow.parity_passed."""
    import mlflow

    rid = _run_id(run_id)
    client = mlflow.MlflowClient()
    client.log_dict(rid, dict(parity), "export/parity.json")
    if "max_abs" in parity:
        client.set_tag(rid, "genflow.parity_max_abs", repr(float(parity["max_abs"])))
    passed = parity.get("passed", parity.get("ok"))
    if passed is not None:
        client.set_tag(rid, "genflow.parity_passed", str(bool(passed)).lower())


def log_summary(summary: Mapping[str, Any], root: Path, run_id: Optional[str] = None) -> None:
    """The pipeline's summary (reports/last_run.json) on its parent run(s); a failed run ends FAILED."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    state = _CURRENT_PIPELINE.get()
    run_ids = [run_id] if run_id else (list(state.run_ids.values()) if state else [])
    if not run_ids:
        raise TrackingError("log_summary: no pipeline run; call it inside `with pipeline_run(...)` or pass run_id=")
    status = str(summary.get("status", "unknown"))
    if state is not None and status == "failed":
        state.status = "FAILED"
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    metrics = []
    if isinstance(summary.get("seconds"), (int, float)) and math.isfinite(summary["seconds"]):
        metrics.append(Metric("pipeline/seconds", float(summary["seconds"]), now, 0))
    for rid in run_ids:
        client.log_dict(rid, dict(summary), "last_run.json")
        client.log_batch(rid, metrics=metrics, tags=[RunTag("genflow.status", status)])
