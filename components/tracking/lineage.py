"""What a run carries: its params, flattened for MLflow, and lineage tags saying where it came from.

    lineage_tags(root, params, key, data_hashes)   # genflow.git_commit, .data_hash.<dataset>, .version.torch ...
    placement_tags(schedule_file)                  # genflow.device, genflow.precision of a training run
    model_params(params, key)                      # {'train.lr': '0.002', 'dataset.source': ...}

Lineage reads its sources directly: git for the code, dvc.lock (or the prepared manifest) for the
data, installed distributions for library versions.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

from components.config import Params, hash_json
from components.families.registry import backbone
from components.layout import Layout
from components.tracking.uri import redact

MAX_PARAM_CHARS = 6000       # MLflow refuses longer param values (mlflow.utils.validation)


# ---------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------

def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 0.002}} -> {'train.lr': '0.002'}; lists as JSON; values cut to MLflow's limit.

    Credentials in URLs are redacted (`redact`): params are shown to everyone who sees the run.
    """
    out: dict[str, str] = {}
    if isinstance(node, Mapping):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    text = redact(node if isinstance(node, str) else json.dumps(node))
    if len(text) > MAX_PARAM_CHARS:
        text = text[:MAX_PARAM_CHARS - 3] + "..."
    out[prefix] = text
    return out


def model_params(params: Params, key: str) -> dict[str, str]:
    """A model's own section (train.lr, unet.channels, ...) plus its dataset's (dataset.source, ...).

    Sections its backbone never reads (e.g. gpt.* of a U-Net) are left out, so that runs compared
    in the MLflow UI show only settings that mattered."""
    m = params.model(key)
    raw = params.to_dict()
    unused = backbone(m.backbone, f"models.{key}.backbone").unused_sections
    section = {k: v for k, v in raw["models"][key].items() if k not in unused}
    out = {"model_key": key}
    out.update(flatten(section))
    out.update(flatten(raw["datasets"].get(m.dataset, {}), "dataset"))
    return out


def pipeline_params(params: Params, models: Iterable[str]) -> dict[str, str]:
    """Pipeline-wide sections (promotion, export, schedule, tracking, ...) and the models in the run;
    a URL's credentials (tracking.tracking_uri, storage.dvc_remote) show as ``***``."""
    raw = params.to_dict()
    out = {"models": ",".join(models)}
    for section, value in raw.items():
        if section not in ("models", "datasets"):
            out.update(flatten(value, section))
    return out


# ---------------------------------------------------------------------------
# Code: git
# ---------------------------------------------------------------------------

# Files whose changes do not make a run unreproducible: DVC's record of the data (the data's
# hashes are in the lineage) and params.yaml (each model run logs the params it used).
_NOT_DIRTY = {"dvc.lock", "params.yaml"}


def git_changes(root: Path) -> Optional[list[str]]:
    """Paths with uncommitted changes (untracked included), except dvc.lock and params.yaml;
    None outside a git repository."""
    try:
        r = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--no-renames"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    paths = [line[3:].strip().strip('"') for line in r.stdout.splitlines() if len(line) > 3]
    return [p for p in paths if p not in _NOT_DIRTY]


def git_state(root: Path) -> tuple[str, str]:
    """(commit, dirty) of the repository holding root; ("unknown", "unknown") outside one.

    dirty is "true" when code or other tracked files differ from the commit (see git_changes)."""
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=20)
        commit = r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    changes = git_changes(root)
    return (commit or "unknown", "unknown" if changes is None else str(bool(changes)).lower())


# ---------------------------------------------------------------------------
# Data: DVC's record (dvc.lock), else the prepared manifest
# ---------------------------------------------------------------------------

def lock_hashes(root: Path) -> dict[str, str]:
    """{output path: md5} of every output recorded in dvc.lock."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    doc = yaml.safe_load(lock.read_text()) or {}
    hashes: dict[str, str] = {}
    for stage in (doc.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("md5"):
                hashes[out["path"]] = out["md5"]
    return hashes


def dataset_hashes(dataset: str, root: Path) -> dict[str, str]:
    """DVC hashes of a dataset's raw snapshot and prepared splits (from dvc.lock)."""
    hashes = lock_hashes(root)
    rel = Layout(".")  # dvc.lock names outputs relative to the project root
    out = {}
    for kind, path in (("raw", rel.raw_dir(dataset)), ("prepared", rel.prepared_dir(dataset))):
        if path.as_posix() in hashes:
            out[kind] = hashes[path.as_posix()]
    return out


def local_data_hashes(dataset: str, root: Path) -> dict[str, Any]:
    """{dataset: DVC hashes} from dvc.lock; without DVC, a hash of the prepared manifest's file md5s."""
    hashes = dataset_hashes(dataset, root)
    if hashes:
        return {dataset: hashes}
    manifest = Layout(root).prepared_dir(dataset) / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {dataset: {"manifest": hash_json(files)}}


# ---------------------------------------------------------------------------
# Lineage tags
# ---------------------------------------------------------------------------

def dist_version(*names: str) -> str:
    """Installed version of the first of `names` that is installed, else "not installed"."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def data_hash_tags(data_hashes: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """{'digits': {'raw': a, 'prepared': b}} -> genflow.data_hash.digits = b (+ .raw, .prepared)."""
    tags = {}
    for dataset, value in (data_hashes or {}).items():
        if isinstance(value, Mapping):
            for kind, h in value.items():
                tags[f"genflow.data_hash.{dataset}.{kind}"] = str(h)
            # models read the prepared splits, so that hash names "the data" of a run
            main = value.get("prepared") or (hash_json(dict(value)) if value else None)
        else:
            main = value
        if main:
            tags[f"genflow.data_hash.{dataset}"] = str(main)
    return tags


def placement_tags(schedule_file: Path) -> dict[str, str]:
    """genflow.device and genflow.precision of a training run, from its schedule.json
    (components.training.write_schedule); a schedule written before they were recorded ran on the
    CPU in fp32; none when there is no readable schedule."""
    try:
        schedule = json.loads(Path(schedule_file).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(schedule, dict):
        return {}
    return {"genflow.device": str(schedule.get("device", "cpu")),
            "genflow.precision": str(schedule.get("precision", "fp32"))}


def lineage_tags(root: Path, params: Optional[Params] = None, key: Optional[str] = None,
                 data_hashes: Optional[Mapping[str, Any]] = None,
                 flow_run_id: Optional[str] = None) -> dict[str, str]:
    """Tags that say where a run came from: code, data, params, orchestrator run, library versions.

    data_hashes: {dataset: hash} or {dataset: {"raw": hash, "prepared": hash}} (DVC hashes).
    With `key`, the params hash is that model's section and the model's eval data hash is set.
    """
    commit, dirty = git_state(root)
    tags = {
        "genflow.git_commit": commit,
        "genflow.git_dirty": dirty,
        "genflow.flow_run_id": flow_run_id or "none",
        "genflow.version.python": platform.python_version(),
        "genflow.version.torch": dist_version("torch"),
        "genflow.version.numpy": dist_version("numpy"),
        "genflow.version.onnxruntime": dist_version("onnxruntime", "onnxruntime-gpu"),
        "genflow.version.mlflow": dist_version("mlflow", "mlflow-skinny"),
    }
    if dirty == "true":
        tags["genflow.git_dirty_files"] = ", ".join(git_changes(root) or [])[:2000]
    tags.update(data_hash_tags(data_hashes))
    if params is not None and key is not None:
        m = params.model(key)
        tags.update({
            "genflow.model_key": key,
            "genflow.family": m.family,
            "genflow.backbone": m.backbone,
            "genflow.dataset": m.dataset,
            "genflow.params_hash": params.section_hash("models", key),
            "genflow.dataset_params_hash": params.section_hash("datasets", m.dataset),
            # the gate compares versions only when their evaluation data are the same
            "genflow.eval_data_hash": tags.get(f"genflow.data_hash.{m.dataset}", "unknown"),
        })
    elif params is not None:
        tags["genflow.params_hash"] = params.hash()
    return tags
