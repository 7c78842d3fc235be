"""Real servers on 127.0.0.1 for the integration tests: `mlflow server`, `prefect server`, and a
throwaway PostgreSQL cluster for them to run on (`start_postgres`).

Each server runs in its own process group with its store in a temporary folder (SQLite, or a
database of that cluster), and is stopped by PID, the whole group, in the fixture's teardown, even
when the test failed. The teardown asserts that no process of the group is left.

Tests elsewhere import the helpers (`from integration.conftest import start_mlflow_server`);
this folder is a package so that this module does not shadow tests/conftest.py.
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def start_mlflow_server(folder: Path, *, wait: bool = True, extra_env: Optional[dict] = None,
                        backend_store_uri: Optional[str] = None) -> Server:
    """`mlflow server` on a free port: artifacts under `folder`, its store there too (SQLite) unless
    `backend_store_uri` names another (e.g. ``postgresql://...``, as the production stack has it).

    One worker and no job runners: ~12 s to healthy instead of ~47 s.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    server = _spawn("mlflow server", cmd, folder, env, url, f"{url}/health")
    return server.wait_healthy() if wait else server


def start_prefect_server(folder: Path, *, wait: bool = True, database_url: Optional[str] = None) -> Server:
    """`prefect server start` on a free port: PREFECT_HOME under `folder`, and its database there
    too (SQLite) unless `database_url` names another (e.g. ``postgresql+asyncpg://...``).

    `url` is the API URL a client puts in PREFECT_API_URL (…/api).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(folder / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}  # the UI's static files are copied at start: not needed here
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url   # the name infra/ uses
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = _spawn("prefect server", cmd, folder, env, url, f"{url}/health")
    return server.wait_healthy() if wait else server


# ---------------------------------------------------------------------------
# PostgreSQL: a throwaway cluster
# ---------------------------------------------------------------------------

PG_BIN_ENV = "GENFLOW_TEST_PG_BIN"
PG_BIN_DEFAULT = "/usr/lib/postgresql/15/bin"      # Debian's postgresql-15
PG_USER = "genflow"                               # the cluster's superuser (a password, over TCP)
PG_TOOLS = ("initdb", "postgres", "pg_ctl", "pg_isready", "createdb", "psql")


def postgres_bin() -> Path:
    return Path(os.environ.get(PG_BIN_ENV) or PG_BIN_DEFAULT)


def _as_postgres() -> dict:
    """Popen arguments that run a command as the `postgres` account when this process is root
    (initdb and postgres refuse root); none otherwise: the cluster then runs as this user."""
    if os.geteuid() != 0:
        return {}
    account = pwd.getpwnam("postgres")
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def postgres_unavailable() -> Optional[str]:
    """Why this machine cannot run a throwaway PostgreSQL cluster, or None when it can."""
    bin_dir = postgres_bin()
    missing = [t for t in PG_TOOLS if not (bin_dir / t).is_file()]
    if missing:
        return (f"PostgreSQL binaries not found in {bin_dir} ({', '.join(missing)}): install "
                f"postgresql-15, or set {PG_BIN_ENV} to the folder holding them")
    try:
        subprocess.run(["true"], check=True, **_as_postgres())
    except KeyError:
        return "running as root and there is no `postgres` account to run the server as (initdb refuses root)"
    except (OSError, subprocess.CalledProcessError) as e:
        return f"running as root and cannot switch to the `postgres` account: {e}"
    return None


def _die_with_parent():
    """A preexec_fn: the postmaster gets SIGQUIT (its immediate shutdown) when the test process
    dies, so a test run killed outright leaves no server behind either. libc is loaded here, in
    the parent: the child may already be another user, who cannot read this Python's files."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGQUIT)   # 1 = PR_SET_PDEATHSIG


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster started by a test: its folder (data, socket, logs), port and postmaster."""
    folder: Path
    port: int
    password: str
    proc: subprocess.Popen
    _log_file: object = field(default=None, repr=False)

    def url(self, database: str, driver: str = "postgresql") -> str:
        """SQLAlchemy URL of `database` over TCP, with the password (what infra/ gives the servers)."""
        return f"{driver}://{PG_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, chars: int = 3000) -> str:
        log = self.folder / "postgres.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""

    def _client(self, tool: str, *args: str) -> str:
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": PG_USER,
               "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        res = subprocess.run([str(postgres_bin() / tool), *args], env=env, capture_output=True, text=True,
                             timeout=60)
        if res.returncode != 0:
            pytest.fail(f"{tool} {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def create_database(self, name: str) -> None:
        self._client("createdb", name)

    def sql(self, database: str, query: str) -> list[tuple[str, ...]]:
        """Rows of `query` in `database`, each a tuple of text fields."""
        out = self._client("psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                           "-d", database, "-c", query)
        return [tuple(line.split("\t")) for line in out.splitlines() if line]

    def stop(self) -> list[int]:
        """`pg_ctl stop -m immediate`, the process group as a backstop, then the folder removed.
        Returns the PIDs that survived (should be none)."""
        try:
            if self.proc.poll() is None:
                subprocess.run([str(postgres_bin() / "pg_ctl"), "stop", "-D", str(self.folder / "data"),
                                "-m", "immediate", "-w", "-t", "30"], cwd=self.folder, capture_output=True,
                               timeout=60, **_as_postgres())
            return stop_group(self.proc.pid, self.proc)
        finally:
            if self._log_file is not None:
                self._log_file.close()
            shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres(databases: tuple[str, ...] = (), *, timeout: float = 60) -> PostgresCluster:
    """A fresh cluster (initdb) in a new temporary folder, listening on a free port of 127.0.0.1
    only, its unix socket inside that folder; `databases` created. Run as the `postgres` account
    when this process is root. Check `postgres_unavailable()` first; `stop()` removes it all.
    """
    as_pg, bin_dir = _as_postgres(), postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="genflow-pg-"))   # 0700; handed to the server's account
    if as_pg:
        os.chown(folder, as_pg["user"], as_pg["group"])
    password = secrets.token_hex(12)
    pwfile = folder / "pwfile"
    pwfile.write_text(password + "\n")
    if as_pg:
        os.chown(pwfile, as_pg["user"], as_pg["group"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(folder)}
    init = subprocess.run([str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", PG_USER,
                           f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                           "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120, **as_pg)
    pwfile.unlink()
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"initdb failed (exit {init.returncode}) in {folder}:\n{init.stdout[-2000:]}{init.stderr[-2000:]}")

    port = free_port()
    log = open(folder / "postgres.log", "wb")
    # durability settings off: a throwaway cluster, and each commit no longer waits on the disk
    cmd = [str(bin_dir / "postgres"), "-D", str(folder / "data"), "-c", "listen_addresses=127.0.0.1",
           "-c", f"port={port}", "-c", f"unix_socket_directories={folder}", "-c", "fsync=off",
           "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    try:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent(), **as_pg)
    except BaseException:
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    cluster = PostgresCluster(folder, port, password, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exit {proc.returncode}" if proc.returncode is not None else "still starting"
                pytest.fail(f"postgres did not accept connections on port {port} ({state}):\n{cluster.log_tail()}")
            time.sleep(0.2)
        for name in databases:
            cluster.create_database(name)
    except BaseException:
        cluster.stop()
        raise
    return cluster


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
def prefect_server(tmp_path_factory):
    """A fresh Prefect server for the module (its `url` is the API URL); stopped at the end."""
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
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

