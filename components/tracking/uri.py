"""Where runs go and how to reach them: the tracking URI, its credentials, the reachability probe.

    uri = check_tracking(root, params)   # MLflow pointed at this project's store, server answering
    redact(uri)                          # 'http://***@host:5000': for anything a person may see

Without a server the store is ``sqlite:///<root>/.genflow/mlflow.db`` with artifacts under
``<root>/.genflow/mlartifacts``; ``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri`` in
params.yaml) switches to a server. MLflow is imported inside the functions.
"""
from __future__ import annotations

import os
import re
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from components.config import Params
from components.errors import ServerError
from components.layout import Layout

DEFAULT_TRIES = 4            # GENFLOW_TRACKING_RETRIES overrides
RETRY_BUDGET_S = 30.0        # all tries together stay under this
PROBE_TIMEOUT_S = 5          # one request of the reachability probe


class TrackingError(ServerError):
    """Tracking was used wrongly or failed (e.g. logging with no active run); the message says what to do."""


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
    store = Layout(Path(root).resolve()).state
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
    return Layout(Path(root).resolve()).state / "mlartifacts"


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


def retries() -> int:
    """Tries of the reachability probe: GENFLOW_TRACKING_RETRIES, else DEFAULT_TRIES."""
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
    tries, start = retries(), time.monotonic()
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
