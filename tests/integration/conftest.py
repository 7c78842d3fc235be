"""Real servers on 127.0.0.1 for the integration tests: `mlflow server` and `prefect server`.

Each server runs in its own process group with its store in a temporary folder (SQLite), and
is stopped by PID, the whole group, in the fixture's teardown, even when the test failed. The
teardown asserts that no process of the group is left.

Tests elsewhere import the helpers (`from integration.conftest import start_mlflow_server`);
this folder is a package so that this module does not shadow tests/conftest.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

HEALTH_TIMEOUT_S = 240   # ~12 s (MLflow) and 8-16 s (Prefect) on an idle machine; generous under load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: Optional[dict] = None, timeout: float = 30) -> dict:
    """GET (or POST `body` as JSON) and decode the answer: the checks use the REST APIs directly."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

def _stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it is dead and only waits for its parent to read it)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return sorted(out)


def stop_group(pgid: int, proc: Optional[subprocess.Popen] = None) -> list[int]:
    """SIGTERM the process group, SIGKILL what is left after 15 s; returns the PIDs still alive."""
    seen = set(group_members(pgid)) | {pgid}
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap the leader as soon as it exits
            seen |= set(group_members(pgid))
            if not any(alive(p) for p in seen):
                break
            time.sleep(0.1)
        else:
            continue
        break
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return sorted(p for p in seen if alive(p))


@dataclass
class Server:
    """A server process started by a test: its URL, health URL, log file and process."""
    name: str
    url: str
    health: str
    proc: subprocess.Popen
    log: Path
    _log_file: object = field(default=None, repr=False)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT_S) -> "Server":
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.health, timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = f"exit {self.proc.returncode}" if self.proc.returncode is not None else "still starting"
                pytest.fail(f"{self.name} did not become healthy at {self.health} ({state}):\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> list[int]:
        """Stop the whole process group; returns the PIDs that survived (should be none)."""
        try:
            return stop_group(self.proc.pid, self.proc)
        finally:
            if self._log_file is not None:
                self._log_file.close()


def _spawn(name: str, cmd: list[str], folder: Path, env: dict, url: str, health: str) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "server.log"
    log = open(log_path, "wb")
    # its own session: one killpg reaches the server's worker processes too
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
                            start_new_session=True)
    return Server(name, url, health, proc, log_path, log)


def start_mlflow_server(folder: Path, *, wait: bool = True, extra_env: Optional[dict] = None) -> Server:
    """`mlflow server` on a free port: SQLite store and artifacts under `folder`.

    One worker and no job runners: ~12 s to healthy instead of ~47 s.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    server = _spawn("mlflow server", cmd, folder, env, url, f"{url}/health")
    return server.wait_healthy() if wait else server


def start_prefect_server(folder: Path, *, wait: bool = True) -> Server:
    """`prefect server start` on a free port: PREFECT_HOME (and its SQLite database) under `folder`.

    `url` is the API URL a client puts in PREFECT_API_URL (…/api).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(folder / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}  # the UI's static files are copied at start: not needed here
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = _spawn("prefect server", cmd, folder, env, url, f"{url}/health")
    return server.wait_healthy() if wait else server


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

def _stop_all(servers: list[Server]) -> None:
    left = {s.name: s.stop() for s in servers}
    assert not any(left.values()), f"processes left behind after stopping: {left}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """URL of a fresh MLflow server for the module; stopped (process group) at the end."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), wait=False)
    try:
        yield server.wait_healthy().url
    finally:
        _stop_all([server])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """An MLflow server and a Prefect server, started side by side; both stopped at the end."""
    base = tmp_path_factory.mktemp("stack")
    servers: list[Server] = []
    try:
        servers.append(start_mlflow_server(base / "mlflow", wait=False))
        servers.append(start_prefect_server(base / "prefect", wait=False))
        for s in servers:
            s.wait_healthy()
        yield {"mlflow": servers[0], "prefect": servers[1]}
    finally:
        _stop_all(servers)

