"""`genflow serve` as users run it: a real uvicorn process on 127.0.0.1, a real MLflow registry
(the session's SQLite store; a real `mlflow server` for the outage), real HTTP requests.

Covers every endpoint, a `genflow promote` and a `genflow rollback` followed under concurrent
load with zero failed requests, a version refused by its smoke check, a full queue, and a
registry that goes away. The server process never imports torch (checked when it exits).
Time limits are upper bounds only; every wait returns as soon as its state is reached.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from integration.conftest import Server, free_port, start_mlflow_server
from serving_models import broken_copy, export_tiny, register, unique

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.5
WAIT_S = 120.0
# uvicorn shuts down on SIGTERM, then raises it again for the handler it found: this one says whether
# the server process imported torch
WRAPPER = """import signal, sys
def report(*_):
    print('TORCH_IMPORTED=%s' % ('torch' in sys.modules), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
from flows.cli import main
code = main(sys.argv[1:])
report()
"""


def call(url: str, body: Optional[dict] = None, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body, lower-case headers) of a GET, or of a POST of `body`; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, headers = r.read(), r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        raw, status, headers = e.read(), e.code, {k.lower(): v for k, v in e.headers.items()}
    try:
        return status, json.loads(raw), headers
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}, headers


def wait_for(check, what: str, server: Server, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline or server.proc.poll() is not None:
            pytest.fail(f"waited for {what}:\n{server.log_tail()}")
        time.sleep(0.1)


def start_serve(folder: Path, args: list[str], env: Optional[dict] = None) -> Server:
    """`genflow serve ARGS` on a free port, in its own process group, cwd `folder` (no params.yaml)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / "serve.log"
    log = open(log_path, "wb")
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, "serve", "--port", str(port), "--poll-seconds",
                             str(POLL_S), "--threads", "1", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=folder,
                            start_new_session=True)
    return Server("genflow serve", url, f"{url}/readyz", proc, log_path, log)


def stop_serve(server: Server) -> str:
    left = server.stop()
    assert not left, f"processes left behind: {left}"
    text = server.log.read_text(errors="replace")
    assert "TORCH_IMPORTED=False" in text, text[-3000:]
    return text


def served(server: Server, name: str) -> Optional[str]:
    status, rows, _ = call(f"{server.url}/v1/models")
    return next((r["version"] for r in rows if r["name"] == name), None) if status == 200 else None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, session_tmp):
    root = tmp_path_factory.mktemp("serve-exports")
    return export_tiny(root), session_tmp / "serve-artifacts"


@pytest.fixture(scope="module")
def service(tiny, tmp_path_factory):
    """A served U-Net (versions 1 champion, 2 unaliased) and text GPT on the session's SQLite registry."""
    folders, artifacts = tiny
    unet, gpt = unique("unet"), unique("gpt")
    register(folders["unet"], unet, artifacts)
    register(folders["unet"], unet, artifacts, alias=None)
    register(folders["gpt"], gpt, artifacts)
    server = start_serve(tmp_path_factory.mktemp("serve"), ["--models", f"{unet},{gpt}", "--max-n", "8"])
    try:
        server.wait_healthy(WAIT_S)
        yield server, unet, gpt
    finally:
        stop_serve(server)


def test_every_endpoint_over_http(service):
    server, unet, gpt = service
    assert call(f"{server.url}/healthz")[:2] == (200, {"status": "ok"})
    status, ready, _ = call(f"{server.url}/readyz")
    assert status == 200 and ready["models"] == {unet: "1", gpt: "1"}
    rows = {r["name"]: r for r in call(f"{server.url}/v1/models")[1]}
    assert rows[unet]["provider"] == "CPUExecutionProvider" and rows[unet]["parity_max_abs"] == 2e-6
    assert rows[gpt]["run_id"] and rows[gpt]["loaded_at"] and rows[gpt]["last_successful_poll"]
    status, body, _ = call(f"{server.url}/v1/models/{unet}/generate",
                           {"n": 4, "label": 2, "steps": 20, "guidance": 1.0, "seed": 0})
    assert status == 200 and len(body["images"]) == 4 and body["version"] == "1"
    status, body, _ = call(f"{server.url}/v1/models/{gpt}/generate",
                           {"prompt": "ab ", "length": 16, "temperature": 0.8, "top_k": 0, "seed": 0})
    assert status == 200 and body["texts"][0].startswith("ab ") and len(body["texts"][0]) == 19
    status, body, _ = call(f"{server.url}/v1/models/{unet}/versions/2/generate", {"n": 1})
    assert status == 200 and body["version"] == "2"
    status, body, _ = call(f"{server.url}/v1/models/{unet}/generate", {"n": 9})
    assert status == 422 and body["detail"][0] == {"field": "n", "problem": "9 is outside 1..8", "allowed": "1..8",
                                                   "got": 9}
    assert call(f"{server.url}/v1/models/nope/generate", {})[0] == 404
    assert call(f"{server.url}/v1/models/{unet}/versions/7/generate", {})[0] == 404
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert f'genflow_serve_requests_total{{model="{unet}",status="200",version="1"}}' in metrics
    assert f'genflow_serve_request_errors_total{{kind="invalid",model="{unet}"}} 1.0' in metrics
    assert "genflow_serve_request_seconds_bucket" in metrics and "genflow_serve_queue_depth" in metrics
    with urllib.request.urlopen(f"{server.url}/docs", timeout=30) as r:
        assert r.status == 200


def test_promote_and_rollback_reach_the_service_under_load_with_no_failed_request(service, tmp_path, monkeypatch):
    from flows.cli import main

    server, unet, _ = service
    monkeypatch.chdir(tmp_path)  # the alias lock lives under the working directory's .genflow/
    params = str(ROOT / "params.yaml")
    stop, answers, lock = threading.Event(), [], threading.Lock()

    def load():
        while not stop.is_set():
            status, body, _ = call(f"{server.url}/v1/models/{unet}/generate", {"n": 2, "steps": 3, "seed": 1})
            with lock:
                answers.append((status, body.get("version"), time.monotonic()))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(answers) >= 8, "requests answered before the promotion", server)
        t0 = time.monotonic()
        assert main(["promote", unet, "2", "--params", params, "--reason", "serve test"]) == 0
        wait_for(lambda: served(server, unet) == "2", "version 2 served after genflow promote", server)
        promoted_s = time.monotonic() - t0
        wait_for(lambda: any(v == "2" and t > t0 for _, v, t in answers), "an answer from version 2", server)
        t1 = time.monotonic()
        assert main(["rollback", unet, "--params", params]) == 0
        wait_for(lambda: served(server, unet) == "1", "version 1 served after genflow rollback", server)
        rolled_s = time.monotonic() - t1
        wait_for(lambda: any(v == "1" and t > t1 + rolled_s for _, v, t in answers), "an answer from 1 again", server)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    failed = [a for a in answers if a[0] != 200]
    assert failed == [], failed[:5]
    assert {v for _, v, _ in answers} == {"1", "2"}
    print(f"\n{len(answers)} requests, none failed; promote followed in {promoted_s:.2f}s, rollback in "
          f"{rolled_s:.2f}s (poll every {POLL_S}s)")
    log = server.log.read_text(errors="replace")
    assert "champion moved 1 -> 2" in log and "champion moved 2 -> 1" in log


def test_a_version_failing_its_smoke_check_is_not_served(service, tiny, tmp_path, monkeypatch):
    from flows.cli import main

    server, unet, _ = service
    folders, artifacts = tiny
    monkeypatch.chdir(tmp_path)
    bad = register(broken_copy(folders["unet"], tmp_path), unet, artifacts, alias=None)
    assert main(["promote", unet, bad, "--params", str(ROOT / "params.yaml")]) == 0
    row = wait_for(lambda: next((r for r in call(f"{server.url}/v1/models")[1]
                                 if r["name"] == unet and r["last_swap_error"]), None), "the refusal", server)
    assert row["version"] == "1" and row["alias_version"] == bad
    assert f"version {bad} refused" in row["last_swap_error"]
    status, body, _ = call(f"{server.url}/v1/models/{unet}/generate", {"n": 1})
    assert status == 200 and body["version"] == "1"
    assert call(f"{server.url}/readyz")[0] == 200
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        assert f'genflow_serve_smoke_check_failures_total{{alias="champion",model="{unet}"}} 1.0' in r.read().decode()
    assert f"version {bad} refused" in server.log.read_text(errors="replace")
    assert main(["rollback", unet, "--params", str(ROOT / "params.yaml")]) == 0


def test_a_full_queue_answers_429_and_a_lost_registry_changes_nothing_served(tiny, tmp_path):
    """On a real `mlflow server`: fill a one-slot queue, then stop the registry under the service."""
    folders, artifacts = tiny
    registry = start_mlflow_server(tmp_path / "mlflow")
    gpt = unique("gpt")
    server = None
    try:
        register(folders["gpt"], gpt, artifacts, tracking_uri=registry.url)
        server = start_serve(tmp_path / "serve", ["--models", gpt, "--max-queue", "1", "--max-batch", "1"],
                             env={"MLFLOW_TRACKING_URI": registry.url})
        server.wait_healthy(WAIT_S)

        # 16 clients against one slot: keep asking until two requests overlap (bounded)
        answers, lock, got_429 = [], threading.Lock(), threading.Event()

        def client():
            deadline = time.monotonic() + 60
            while not got_429.is_set() and time.monotonic() < deadline:
                status, body, headers = call(f"{server.url}/v1/models/{gpt}/generate", {"length": 200, "seed": 2})
                with lock:
                    answers.append((status, headers.get("retry-after"), body))
                if status == 429:
                    got_429.set()

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        full = [a for a in answers if a[0] == 429]
        assert full, f"no 429 in {len(answers)} answers"
        assert {a[0] for a in answers} <= {200, 429}
        assert full[0][1] == "1" and full[0][2]["error"] == "queue full"

        registry.stop()
        wait_for(lambda: "registry unreachable" in server.log.read_text(errors="replace"), "the outage logged",
                 server)
        polls_before = server.log.read_text(errors="replace").count("registry unreachable")

        def failed_polls() -> float:
            with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
                line = [x for x in r.read().decode().splitlines()
                        if x.startswith('genflow_serve_registry_polls_total{outcome="unreachable"}')]
            return float(line[0].split()[-1]) if line else 0.0

        wait_for(lambda: failed_polls() >= 4, "four failed polls", server)
        assert call(f"{server.url}/readyz")[0] == 200
        status, body, _ = call(f"{server.url}/v1/models/{gpt}/generate", {"length": 4})
        assert status == 200 and body["version"] == "1"
        row = call(f"{server.url}/v1/models")[1][0]
        assert row["registry_reachable"] is False and row["last_successful_poll"] and row["version"] == "1"
        assert server.log.read_text(errors="replace").count("registry unreachable") == polls_before == 1
    finally:
        if server is not None:
            stop_serve(server)
        registry.stop()
