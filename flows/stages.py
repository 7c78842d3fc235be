"""The pipeline's stages as plain functions: `genflow stage NAME KEY`, `dvc repro` and the
Prefect flow all call these. Each one reads params, calls one component, returns a small dict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from components.config import Params, ParamsError, hash_json
from components.families.registry import family_of
from components.layout import Layout

DATASET_STAGES = ("ingest", "validate", "prepare")
MODEL_STAGES = ("train", "evaluate", "export")
STAGES = DATASET_STAGES + MODEL_STAGES


def ingest(params: Params, name: str, root: Path) -> dict:
    from components import data

    path = data.ingest(name, params.dataset(name), root)
    return {"path": str(path)}


# What a validation result depends on besides the raw data and the dataset's params: the suites and
# the readers they run on (more than dvc.yaml's validate deps, which name validation.py alone)
VALIDATION_CODE = ("components/validation.py", "components/data.py", "components/captions.py")
VALIDATED_DIR = Path(".genflow") / "validated"   # <dataset>.json: the inputs of its last passed validation


def validation_inputs(params: Params, name: str, root: Path) -> str:
    """Hash of everything the validation of dataset `name` depends on: the bytes of data/raw/<name>,
    its datasets.<name> params, the validation code and Great Expectations' version."""
    from importlib import metadata

    from components.data import raw_dir, tree_md5s
    from components.versioning import code_version

    return hash_json({"raw": tree_md5s(raw_dir(name, root)), "dataset": params.section_hash("datasets", name),
                       "code": code_version(root, VALIDATION_CODE),
                       "great_expectations": metadata.version("great_expectations")})


def validate(params: Params, name: str, root: Path) -> dict:
    """The dataset's Great Expectations suite; a passed validation of the same inputs
    (validation_inputs) is reused, so a scheduled run on unchanged data validates nothing."""
    import json

    from components import validation
    from components.files import read_json_cache, write_json

    inputs = validation_inputs(params, name, root)
    record = root / VALIDATED_DIR / f"{name}.json"
    report = validation.validation_path(name, root)
    if read_json_cache(record).get("inputs") == inputs and report.is_file():
        try:
            summary = json.loads(report.read_text())
        except ValueError:
            summary = {}
        if summary.get("success") is True:
            print(f"validate {name}: raw data, params and suite unchanged since it passed; "
                  f"{report.relative_to(root)} kept")
            return summary
    summary = validation.validate(name, params.dataset(name), root)   # raises on failure: nothing recorded
    write_json(record, {"inputs": inputs})
    return summary


def prepare(params: Params, name: str, root: Path) -> dict:
    from components import data

    path = data.prepare(name, params.dataset(name), root)
    return {"path": str(path)}


def train(params: Params, key: str, root: Path) -> dict:
    from components.families import base

    return base.train(key, params, root)


def evaluate(params: Params, key: str, root: Path) -> dict:
    return family_of(params, key).evaluate(key, params, root)


def export(params: Params, key: str, root: Path) -> dict:
    from components import export as onnx_export

    model, config = family_of(params, key).load_model(key, root)
    return onnx_export.export_model(key, model, config, params.export, root)


def evaluate_registered(params: Params, key: str, run_id: str, root: Path) -> dict:
    """Evaluate the checkpoint logged by run `run_id` (a registered version) on today's prepared
    data, with today's evaluation settings, in a scratch folder; returns its eval/ perf/ metrics.

    The gate uses it when the data changed since the champion was measured: both models are then
    compared on the same data."""
    import shutil
    import tempfile

    import mlflow

    from components.tracking import check_tracking

    here = Layout(Path(root).resolve())
    here.cache.mkdir(parents=True, exist_ok=True)
    scratch = Layout(Path(tempfile.mkdtemp(prefix=f"reeval-{key}-", dir=here.state)))
    try:
        scratch.data.symlink_to(here.data, target_is_directory=True)   # today's data and reference cache
        scratch.state.mkdir()
        scratch.cache.symlink_to(here.cache, target_is_directory=True)
        model_dir = scratch.model_dir(key)
        model_dir.mkdir(parents=True)
        client = mlflow.MlflowClient(check_tracking(here.root, params))
        got = client.download_artifacts(run_id, "checkpoint/model.pt", str(scratch.root / "dl"))
        shutil.move(got, model_dir / "model.pt")
        return family_of(params, key).evaluate(key, params, scratch.root)
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)


RUNNERS: dict[str, Callable[[Params, str, Path], dict]] = {
    "ingest": ingest, "validate": validate, "prepare": prepare,
    "train": train, "evaluate": evaluate, "export": export,
}


def run_stage(params: Params, stage: str, key: str, root: Path) -> dict:
    """Run one stage for one dataset (data stages) or model (model stages)."""
    if stage not in RUNNERS:
        raise ParamsError(f"stage {stage!r}: unknown; choose one of {', '.join(STAGES)}")
    if stage in DATASET_STAGES:
        params.dataset(key)
    else:
        params.model(key)
    return RUNNERS[stage](params, key, Path(root))
