"""MLflow tracking: where runs go, what they carry, and one clear line when the server is away.

How a pipeline run looks in MLflow::

    experiment  <tracking.experiment_prefix>-<dataset>     one per dataset, e.g. genflow-digits
      run       pipeline 2026-11-27 03:00:00             one per `genflow run` (per dataset it touches)
        run     digits-unet                              nested, one per model: params, metrics,
                                                         artifacts, the ONNX model it registered

Every run carries lineage tags ``genflow.*`` (see `lineage_tags`). Without a server the store is
``sqlite:///<root>/.genflow/mlflow.db`` with artifacts under ``<root>/.genflow/mlartifacts``;
``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri`` in params.yaml) switches to a server.

MLflow is imported inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

import contextvars
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import yaml

from components.config import Params, hash_json

MAX_PARAM_CHARS = 6000       # MLflow refuses longer param values (mlflow.utils.validation)
MAX_TAG_CHARS = 8000         # same for run tags
DEFAULT_TRIES = 4            # GENFLOW_TRACKING_RETRIES overrides
RETRY_BUDGET_S = 30.0        # all tries together stay under this
PROBE_TIMEOUT_S = 5          # one request of the reachability probe


class TrackingError(ValueError):
    """Tracking was used wrongly (e.g. logging with no active run); the message says what to do."""


# set (to "1") by the command line when it copied params.yaml's tracking.tracking_uri into
# MLFLOW_TRACKING_URI, so that messages name the setting the user wrote
URI_FROM_PARAMS_ENV = "GENFLOW_TRACKING_URI_FROM_PARAMS"


class TrackingUnavailable(TrackingError):
    """The MLflow tracking server did not answer; the message names the URI."""


class TrackingAuthError(TrackingError):
    """The MLflow tracking server refused the credentials (HTTP 401/403); retrying cannot help."""


# ---------------------------------------------------------------------------
# Where runs go
# ---------------------------------------------------------------------------

def tracking_uri(root: Path, params: Optional[Params] = None) -> str:
    """MLFLOW_TRACKING_URI if set, else params' tracking.tracking_uri, else SQLite under <root>/.genflow/.

    The URI is returned as configured and may carry credentials: show it with `redact`.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if params is not None and params.tracking.tracking_uri.strip():
        return params.tracking.tracking_uri.strip()
    store = Path(root).resolve() / ".genflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """True for a tracking server reached over HTTP (it decides where artifacts go)."""
    return uri.strip().lower().startswith(("http://", "https://", "databricks"))


# The user:password@ part of any URL in a text (greedy: a password may hold a raw '@')
_USERINFO = re.compile(r"(?<=://)[^/\s?#]*@")


def redact(text: Any) -> str:
    """Hide credentials in the URLs of a text: 'http://me:secret@host:5000' -> 'http://***@host:5000'.

    For anything a person or MLflow may see: params, tags, log lines, error messages.
    """
    return _USERINFO.sub("***@", str(text))


def strip_userinfo(text: str) -> str:
    """'http://me:secret@host' -> 'http://host': for settings handed to other services (Prefect
    stores flow-run parameters) once `check_tracking` has moved the credentials to the environment."""
    return _USERINFO.sub("", str(text))


def artifact_root(root: Path) -> Path:
    return Path(root).resolve() / ".genflow" / "mlartifacts"


def experiment_name(params: Params, dataset: str) -> str:
    return f"{params.tracking.experiment_prefix}-{dataset}"


@contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's own HTTP client retries for minutes by default; the probe wants one short try."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(PROBE_TIMEOUT_S)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _tries() -> int:
    text = os.environ.get("GENFLOW_TRACKING_RETRIES", "")
    try:
        return max(1, int(text)) if text else DEFAULT_TRIES
    except ValueError:
        raise TrackingError(f"GENFLOW_TRACKING_RETRIES={text!r}: expected a whole number of tries, e.g. 4") from None


def check_tracking(root: Path, params: Optional[Params] = None) -> str:
    """Point MLflow at this project's store and make sure it answers; returns the URI.

    Credentials in a server URI (``http://user:password@host``) move to MLFLOW_TRACKING_USERNAME
    and MLFLOW_TRACKING_PASSWORD (those win when already set) and MLflow gets the URI without
    them, so they appear in no log line ("View run at ...") or error; the URI returned has none.
    A server is probed with exponential backoff (GENFLOW_TRACKING_RETRIES tries, at most ~30 s
    in all); when it never answers, raises `TrackingUnavailable` naming the URI. A server that
    refuses the credentials (HTTP 401/403) raises `TrackingAuthError` at once: a retry cannot help.
    """
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    from_env = bool((env or "").strip())
    # where the URI came from, for messages: the command line copies params' URI into the variable
    setting = "MLFLOW_TRACKING_URI" if from_env and not os.environ.get(URI_FROM_PARAMS_ENV) \
        else "tracking.tracking_uri"
    uri = tracking_uri(root, params)
    parts = urllib.parse.urlsplit(uri)
    if is_server(uri) and "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(user))
        if password:
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(password))
        uri = urllib.parse.urlunsplit(parts._replace(netloc=host))
        if from_env:
            os.environ["MLFLOW_TRACKING_URI"] = uri  # what child processes inherit: no secret either
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI to MLFLOW_TRACKING_URI; undo that, or it would look user-set
    # and shadow the default store of another root later in this process.
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    if not is_server(uri):
        return uri  # a local database is created on first use; nothing to wait for
    tries, start = _tries(), time.monotonic()
    for attempt in range(1, tries + 1):
        try:
            with _quick_http():
                mlflow.MlflowClient(uri).search_experiments(max_results=1)
            return uri
        except Exception as e:  # refused, timed out, 5xx: all mean "not usable now"
            status = e.get_http_status_code() if hasattr(e, "get_http_status_code") else None
            if status in (401, 403):
                what = "refused the credentials" if status == 401 else "denied this user access"
                raise TrackingAuthError(
                    f"MLflow at {redact(uri)} {what} (HTTP {status}); check MLFLOW_TRACKING_USERNAME and "
                    f"MLFLOW_TRACKING_PASSWORD (or the user:password@ part of {setting})") from None
            delay = 0.5 * 2 ** (attempt - 1)
            if attempt == tries or time.monotonic() - start + delay + PROBE_TIMEOUT_S > RETRY_BUDGET_S:
                break
            time.sleep(delay)
    raise TrackingUnavailable(f"cannot reach MLflow at {redact(uri)} after {attempt} "
                              f"{'try' if attempt == 1 else 'tries'}; start the server or set {setting}"
                              + ("" if setting.startswith("MLFLOW") else " in params.yaml"))


def ensure_experiment(client: Any, name: str, uri: str, root: Path) -> str:
    """Experiment id for `name`, created if needed (local stores: artifacts under .genflow/mlartifacts)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        # Without an explicit location a local store writes artifacts to ./mlruns of the CWD.
        location = None if is_server(uri) else (artifact_root(root) / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# ---------------------------------------------------------------------------
# What runs carry: params and lineage
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


# Sections of a model's params that its backbone never reads: kept out of its run's params so
# that runs compared in the MLflow UI show only settings that mattered.
UNUSED_SECTIONS = {"unet": ("dit", "gpt", "masked"), "dit": ("unet", "gpt", "masked"),
                   "gpt": ("unet", "dit", "diffusion", "masked"), "mdlm": ("unet",)}


def model_params(params: Params, key: str) -> dict[str, str]:
    """A model's own section (train.lr, unet.channels, ...) plus its dataset's (dataset.source, ...)."""
    m = params.model(key)
    raw = params.to_dict()
    section = {k: v for k, v in raw["models"][key].items() if k not in UNUSED_SECTIONS.get(m.backbone, ())}
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


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _data_hash_tags(data_hashes: Optional[Mapping[str, Any]]) -> dict[str, str]:
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
        "genflow.version.torch": _dist_version("torch"),
        "genflow.version.numpy": _dist_version("numpy"),
        "genflow.version.onnxruntime": _dist_version("onnxruntime", "onnxruntime-gpu"),
        "genflow.version.mlflow": _dist_version("mlflow", "mlflow-skinny"),
    }
    if dirty == "true":
        tags["genflow.git_dirty_files"] = ", ".join(git_changes(root) or [])[:2000]
    tags.update(_data_hash_tags(data_hashes))
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


def _local_data_hashes(dataset: str, root: Path) -> dict[str, Any]:
    """DVC hashes from dvc.lock; without DVC, a hash of the prepared manifest's file md5s."""
    try:
        from components.versioning import dataset_hashes

        hashes = dataset_hashes(dataset, root)
    except ImportError:
        hashes = {}
    if hashes:
        return {dataset: hashes}
    manifest = Path(root) / "data" / "prepared" / dataset / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {dataset: {"manifest": hash_json(files)}}


@contextmanager
def model_run(key: str, params: Params, root: Path, parent_run_id: Optional[str] = None, *,
              flow_run_id: Optional[str] = None, data_hashes: Optional[Mapping[str, Any]] = None,
              extra_tags: Optional[Mapping[str, str]] = None) -> Iterator[Any]:
    """Nested run named after the model key; yields MLflow's ActiveRun (active in this thread).

    Logs the model's flattened params and lineage tags. Data hashes and the flow-run id default
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
        hash_tags = _data_hash_tags(data_hashes if data_hashes is not None
                                    else _local_data_hashes(m.dataset, root))
    tags = lineage_tags(root, params, key, None, flow_run_id or parent_tags.get("genflow.flow_run_id"))
    tags.update(hash_tags)
    tags["genflow.eval_data_hash"] = hash_tags.get(base, "unknown")
    tags.update(extra_tags or {})
    active = mlflow.active_run()
    nested = active is not None and active.info.run_id == parent_id
    with mlflow.start_run(experiment_id=exp_id, run_name=key, parent_run_id=parent_id,
                          nested=nested, tags=tags) as run:
        mlflow.log_params(model_params(params, key))
        mlflow.log_text(yaml.safe_dump(run_params(params, key), sort_keys=False), PARAMS_ARTIFACT)
        yield run


PARAMS_ARTIFACT = "lineage/params.yaml"


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

    root = Path(root)
    rid = _run_id(run_id)
    dataset = params.model(key).dataset if params is not None else \
        mlflow.MlflowClient().get_run(rid).data.tags.get("genflow.dataset")
    logged = []
    reports = root / "reports" / key
    if reports.is_dir():
        logged += log_files(sorted(reports.iterdir()), "reports", rid)
    if dataset:
        logged += log_files([root / "data" / "validation" / f"{dataset}.json"], "validation", rid)
    logged += log_files([root / "exports" / key / "parity.json"], "export", rid)
    model_dir = root / "models" / key
    logged += log_files([model_dir / "model.pt", model_dir / "train_metrics.json", model_dir / "schedule.json"],
                        "checkpoint", rid)
    try:  # how training ran: what `genflow reproduce` must repeat
        schedule = json.loads((model_dir / "schedule.json").read_text())
        mlflow.MlflowClient().set_tag(rid, "genflow.train_threads", str(schedule["threads"]))
        mlflow.MlflowClient().set_tag(rid, "genflow.train_steps", str(schedule["steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
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
