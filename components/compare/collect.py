"""Collect: one pipeline run and its model runs, from MLflow.

    pipeline = collect(client, "genflow", run_id=None)   # the latest pipeline run's models
    m.seeds = seed_history(client, m)                     # runs of the same model with other seeds

A pipeline run is one parent MLflow run per dataset experiment (tag genflow.kind = pipeline,
siblings listed in genflow.pipeline_runs), each with one nested child run per model, named by
its key. A model the run skipped (inputs unchanged) is read from the run of the version it kept.
MLflow is only used through the client passed in.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from components.compare.model import (
    NOT_APPLICABLE_TAG,
    REQUIRED_METRICS,
    CompareError,
    ModelResult,
    Pipeline,
    known_backbone,
)


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
    entry = known_backbone(backbone)  # older runs may lack the family or kind: the registry's, else diffusion/image
    family = tags.get("genflow.family") or (entry.family_name if entry else "diffusion")
    kind = params.get("dataset.kind") or (entry.data_kinds[0] if entry else "image")
    return ModelResult(key=key, family=family, backbone=backbone, dataset=tags.get("genflow.dataset", ""),
                       kind=kind, run_id=run.info.run_id, metrics=dict(run.data.metrics), params=dict(params),
                       experiment_id=run.info.experiment_id, note=note, not_applicable=not_applicable(run))


def not_applicable(run) -> dict[str, str]:
    """{metric: reason} the run cannot have: its tag genflow.not_applicable (JSON), and class accuracy
    when its dataset params say the data is unlabelled (dataset.labelled false)."""
    from components.evaluation.images import UNLABELLED

    tag = _json_tag(run, NOT_APPLICABLE_TAG)
    out = {str(k): str(v) for k, v in tag.items()} if isinstance(tag, dict) else {}
    if str(run.data.params.get("dataset.labelled", "")).lower() in ("false", "0", "no"):
        out.setdefault("class_acc", UNLABELLED)
    return out


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

