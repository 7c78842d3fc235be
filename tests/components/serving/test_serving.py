"""`genflow serve`'s app in-process (FastAPI TestClient): endpoints, bad input, alias moves, smoke
checks, the queue, micro-batching, an unreachable registry. The real uvicorn process is in
tests/integration/test_serve.py.

Models are tiny exports registered in the session's SQLite store under fresh names per module.
Nothing waits on the machine's speed: the queue tests hold the engine with an Event.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from components.serving import queue as serving_queue
from components.serving.app import ServeSettings, create_app
from serving_models import broken_copy, export_tiny, register, unique

POLL_S = 0.1
WAIT_S = 60.0  # upper bound only: the checks return as soon as the state is reached


@pytest.fixture(scope="module")
def registered(tmp_path_factory, session_tmp):
    """Four tiny models, each registered once with alias champion: {kind: (name, folder)}."""
    root = tmp_path_factory.mktemp("serving-root")
    folders = export_tiny(root)
    artifacts = session_tmp / "serving-artifacts"
    names = {}
    for kind, folder in folders.items():
        names[kind] = (unique(kind), folder)
        register(folder, names[kind][0], artifacts)
    return names, artifacts


def settings(tmp_path: Path, models, **kw) -> ServeSettings:
    return ServeSettings(root=tmp_path, tracking_uri=os.environ["MLFLOW_TRACKING_URI"], models=tuple(models),
                         poll_seconds=POLL_S, threads=1, **kw)


def wait_for(check, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f}s for {what}")
        time.sleep(0.05)


def ready(client: TestClient) -> dict:
    return wait_for(lambda: client.get("/readyz").status_code == 200 and client.get("/readyz").json(), "/readyz 200")


def served_version(client: TestClient, name: str):
    return next(m["version"] for m in client.get("/v1/models").json() if m["name"] == name)


def decode(png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))


@pytest.fixture(scope="module")
def app_client(registered, tmp_path_factory):
    names, _ = registered
    app = create_app(settings(tmp_path_factory.mktemp("serve"), [n for n, _ in names.values()], max_n=8,
                              max_length=40))
    with TestClient(app) as client:
        ready(client)
        yield client, names


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------

def test_health_readiness_models_metrics_and_docs(app_client):
    client, names = app_client
    assert client.get("/healthz").json() == {"status": "ok"}
    assert set(client.get("/readyz").json()["models"]) == {n for n, _ in names.values()}
    rows = {m["name"]: m for m in client.get("/v1/models").json()}
    unet = rows[names["unet"][0]]
    assert unet["version"] == "1" and unet["alias"] == "champion" and unet["status"] == "serving"
    assert unet["provider"] == "CPUExecutionProvider" and unet["parity_max_abs"] == 2e-6
    assert unet["run_id"] and unet["loaded_at"] and unet["last_successful_poll"] and unet["last_swap_error"] is None
    assert {rows[names[k][0]]["graph"] for k in names} == {"denoiser", "causal_lm", "masked_lm"}
    text = client.get("/metrics").text
    for metric in ("genflow_serve_requests_total", "genflow_serve_request_seconds", "genflow_serve_model_swaps_total",
                   "genflow_serve_smoke_check_failures_total", "genflow_serve_queue_depth",
                   "genflow_serve_registry_up 1.0"):
        assert metric in text, metric
    assert client.get("/docs").status_code == 200
    assert "/v1/models/{name}/generate" in client.get("/openapi.json").json()["paths"]


def test_readyz_is_503_with_the_reason_until_the_models_are_loaded(registered, tmp_path):
    app = create_app(settings(tmp_path, [registered[0]["unet"][0], "srv-never-registered"]))
    with TestClient(app) as client:
        wait_for(lambda: client.get("/v1/models").json()[0]["version"], "the registered one loaded")
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["reason"] == "srv-never-registered: not in the MLflow registry yet"
        r = client.post("/v1/models/srv-never-registered/generate", json={})
        assert r.status_code == 404 and r.json()["detail"][0]["problem"].endswith("not in the MLflow registry yet")


def test_images_are_what_genflow_sample_draws_with_the_same_settings(app_client, tmp_path):
    from flows.sample import sample_cli

    client, names = app_client
    name = names["unet"][0]
    r = client.post(f"/v1/models/{name}/generate", json={"n": 4, "label": 1, "steps": 5, "guidance": 2.0, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == name and body["version"] == "1" and len(body["images"]) == 4 and body["ms"] > 0
    ours = [decode(png) for png in body["images"]]
    assert ours[0].shape == (8, 8)
    out = tmp_path / "grid.png"
    sample_cli(Namespace(model=f"{name}:1", count=4, out=str(out), label=1, steps=5, guidance=2.0, prompt=None,
                         length=None, temperature=None, top_k=None, seed=7, exports=None), tmp_path)
    grid = np.asarray(Image.open(out))  # one row of 4 cells, each pixel 4x4, 2-pixel gaps
    for i, image in enumerate(ours):
        cell = grid[2:2 + 32:4, 2 + i * 34:2 + i * 34 + 32:4]
        np.testing.assert_array_equal(cell, image)
    again = client.post(f"/v1/models/{name}/generate", json={"n": 4, "label": 1, "steps": 5, "guidance": 2.0,
                                                             "seed": 7}).json()["images"]
    assert again == body["images"]


def sample_file_texts(path: Path) -> list[str]:
    parts = path.read_text().split("=== sample ")[1:]
    return [p.split("===\n", 1)[1].rstrip("\n") for p in parts]


@pytest.mark.parametrize("kind, body, flags", [
    ("gpt", {"prompt": "ab", "length": 20, "temperature": 0.8, "top_k": 0, "seed": 3, "n": 2},
     dict(prompt="ab", length=20, temperature=0.8, top_k=0, seed=3, count=2, steps=None)),
    ("mdlm", {"prompt": "ha", "length": 9, "steps": 3, "seed": 5, "n": 2},
     dict(prompt="ha", length=9, steps=3, seed=5, count=2, temperature=None, top_k=None)),
])
def test_texts_are_what_genflow_sample_writes_with_the_same_settings(app_client, tmp_path, kind, body, flags):
    from flows.sample import sample_cli

    client, names = app_client
    name = names[kind][0]
    r = client.post(f"/v1/models/{name}/generate", json=body)
    assert r.status_code == 200, r.text
    texts = r.json()["texts"]
    assert len(texts) == 2 and all(t.startswith(body["prompt"]) for t in texts)
    out = tmp_path / "s.txt"
    sample_cli(Namespace(model=f"{name}@champion", out=str(out), label=None, guidance=None, exports=None, **flags),
               tmp_path)
    assert sample_file_texts(out) == texts


def test_pixel_gpt_images_and_a_pinned_version(app_client, registered):
    client, names = app_client
    name, folder = names["pixels"]
    r = client.post(f"/v1/models/{name}/generate", json={"n": 3, "label": 2, "seed": 1, "temperature": 1.0})
    assert r.status_code == 200, r.text
    assert [decode(p).shape for p in r.json()["images"]] == [(4, 4)] * 3
    v2 = register(folder, name, registered[1], alias=None)
    r = client.post(f"/v1/models/{name}/versions/{v2}/generate", json={"n": 3, "label": 2, "seed": 1})
    assert r.status_code == 200 and r.json()["version"] == v2 and r.json()["alias"] is None
    assert served_version(client, name) == "1"  # pinning moves nothing
    assert v2 in next(m for m in client.get("/v1/models").json() if m["name"] == name)["pinned_versions"]


# ---------------------------------------------------------------------------
# Bad input: 422 / 404 naming the field, counted, nothing breaks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, body, field, allowed", [
    ("unet", {"n": 9}, "n", "1..8"),
    ("unet", {"n": 0}, "n", "1..8"),
    ("unet", {"n": "4"}, "n", "1..8"),
    ("unet", {"steps": 21}, "steps", "1..20"),
    ("unet", {"steps": 0}, "steps", "1..20"),
    ("unet", {"label": 3}, "label", "0..2"),
    ("unet", {"guidance": -1}, "guidance", ">= 0"),
    ("unet", {"temperature": 0.5}, "temperature", None),
    ("unet", {"colour": "red"}, "colour", None),
    ("unet", [1, 2], "body", None),
    ("pixels", {"steps": 3}, "steps", None),
    ("pixels", {"top_k": 6}, "top_k", "0..5"),
    ("gpt", {"length": 41}, "length", "1..40"),
    ("gpt", {"prompt": "xyz"}, "prompt", None),
    ("gpt", {"prompt": "a" * 17}, "prompt", None),
    ("gpt", {"temperature": 0}, "temperature", "> 0"),
    ("gpt", {"top_k": 12}, "top_k", "0..11"),
    ("gpt", {"steps": 2}, "steps", None),
    ("gpt", {"prompt": 5}, "prompt", None),
    ("mdlm", {"prompt": "ab", "length": 15}, "length", None),
    ("mdlm", {"steps": 0}, "steps", None),
])
def test_bad_requests_are_422_naming_the_field(app_client, kind, body, field, allowed):
    client, names = app_client
    name = names[kind][0]
    r = client.post(f"/v1/models/{name}/generate", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["field"] == field and detail["problem"]
    if allowed:
        assert detail["allowed"] == allowed
    assert client.post(f"/v1/models/{name}/generate", json={"n": 1}).status_code == 200  # still served


def test_wrong_json_unknown_models_and_versions_are_counted(app_client):
    client, names = app_client
    name = names["unet"][0]
    r = client.post(f"/v1/models/{name}/generate", content=b"{half", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "body"
    r = client.post("/v1/models/no-such-model/generate", json={})
    assert r.status_code == 404 and r.json()["detail"][0]["field"] == "name"
    r = client.post(f"/v1/models/{name}/versions/99/generate", json={})
    assert r.status_code == 404 and r.json()["detail"][0]["field"] == "version"
    assert "no such version" in r.json()["detail"][0]["problem"]
    r = client.post(f"/v1/models/{name}/versions/latest/generate", json={})
    assert r.status_code == 404
    r = client.post("/v1/models/no-such-model/versions/1/generate", json={})
    assert r.status_code == 404 and r.json()["detail"][0]["field"] == "name"
    metrics = client.get("/metrics").text
    assert f'genflow_serve_request_errors_total{{kind="invalid",model="{name}"}}' in metrics
    assert 'genflow_serve_request_errors_total{kind="not_found",model="(unknown)"}' in metrics
    assert f'genflow_serve_request_errors_total{{kind="not_found",model="{name}"}}' in metrics


# ---------------------------------------------------------------------------
# Following the alias; the smoke check
# ---------------------------------------------------------------------------

def test_an_alias_move_is_followed_and_a_broken_version_is_refused(registered, tmp_path):
    import mlflow

    (_, folder), artifacts = registered[0]["unet"], registered[1]
    name = unique("follow")
    register(folder, name, artifacts)
    app = create_app(settings(tmp_path, [name]))
    with TestClient(app) as client:
        ready(client)
        v2 = register(folder, name, artifacts)
        wait_for(lambda: served_version(client, name) == v2, f"version {v2} served")
        v3 = register(broken_copy(folder, tmp_path), name, artifacts)
        refused = f'genflow_serve_smoke_check_failures_total{{alias="champion",model="{name}"}} 1.0'
        wait_for(lambda: refused in client.get("/metrics").text, "the smoke check failure counted")
        row = next(m for m in client.get("/v1/models").json() if m["name"] == name)
        assert row["version"] == v2 and row["alias_version"] == v3
        error = row["last_swap_error"]
        assert error.startswith(f"version {v3} refused: ") and "does not load" in error
        assert client.post(f"/v1/models/{name}/generate", json={"n": 1}).json()["version"] == v2
        assert client.get("/readyz").status_code == 200
        mlflow.MlflowClient().set_registered_model_alias(name, "champion", "1")  # a rollback of sorts
        wait_for(lambda: served_version(client, name) == "1", "version 1 served again")
        assert next(m for m in client.get("/v1/models").json() if m["name"] == name)["last_swap_error"] is None
        assert f'genflow_serve_model_swaps_total{{alias="champion",model="{name}"}} 3.0' in client.get("/metrics").text


@pytest.mark.parametrize("kind", ["unet", "gpt", "pixels", "mdlm"])
def test_the_smoke_check_replays_the_exports_parity_inputs(registered, tmp_path, tmp_path_factory, kind):
    import shutil

    from components.inference import load_engine
    from components.inference.replay import PARITY_INPUTS_FILE, replay
    from components.serving.models import SmokeCheckFailed, smoke_check

    folder = registered[0][kind][1]
    engine = load_engine(folder, threads=1)
    engine.name = kind
    result = replay(folder, engine.session)
    assert result is not None and result["max_abs"] <= 1e-6 and result["atol"] > 0
    smoke_check(engine)   # passes on the graph it was recorded from

    # the same shapes with other weights (a graph that loads and runs, but is not what was checked)
    other = export_tiny(tmp_path_factory.mktemp("other-weights"), seed=1)[kind]
    drifted = tmp_path / "drifted"
    shutil.copytree(folder, drifted)
    shutil.copy(other / "model.onnx", drifted / "model.onnx")
    engine = load_engine(drifted, threads=1)
    engine.name = kind
    with pytest.raises(SmokeCheckFailed, match=r"its export's parity inputs give \w+ off by .* from the "
                                               r"exported graph.s \(above export.parity_atol"):
        smoke_check(engine)

    (drifted / PARITY_INPUTS_FILE).unlink()   # an export from before the record: the request alone
    smoke_check(load_engine(drifted, threads=1))


def test_default_serves_every_registered_model_holding_the_alias(registered, tmp_path):
    names, _ = registered
    app = create_app(ServeSettings(root=tmp_path, tracking_uri=os.environ["MLFLOW_TRACKING_URI"], poll_seconds=60,
                                   threads=1))
    ours = {n for n, _ in names.values()}
    with TestClient(app) as client:  # other modules' champions may be in the store too: look at ours
        rows = wait_for(lambda: [m for m in client.get("/v1/models").json() if m["name"] in ours and m["version"]],
                        "our four models served", timeout=120)
        wait_for(lambda: len([m for m in client.get("/v1/models").json() if m["name"] in ours and m["version"]])
                 == len(ours), "our four models served", timeout=120)
        assert rows and all(m["alias"] == "champion" for m in rows)


def test_the_cli_refuses_bad_flags_and_a_taken_port_in_one_line(capsys, tmp_path, monkeypatch):
    import socket

    from flows.cli import main

    monkeypatch.chdir(tmp_path)  # no params.yaml here: serve needs none
    assert main(["serve", "--max-n", "0"]) == 1
    assert capsys.readouterr().err.strip() == "genflow serve: --max-n: 0 is out of range (at least 1)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"genflow serve: --host 127.0.0.1 --port {port}: cannot listen there (") and "\n" not in err


# ---------------------------------------------------------------------------
# Queue, timeouts, micro-batching (the engine held by an Event: no timing assumptions)
# ---------------------------------------------------------------------------

@pytest.fixture
def held_engine(monkeypatch):
    """run_jobs blocks until release.set(); records each batch's size."""
    release, started, sizes = threading.Event(), threading.Event(), []
    real = serving_queue.run_jobs

    def held(engine, jobs):
        sizes.append(len(jobs))
        started.set()
        assert release.wait(60)
        return real(engine, jobs)

    monkeypatch.setattr(serving_queue, "run_jobs", held)
    yield release, started, sizes
    release.set()


def post_in_thread(client, url, body, results):
    t = threading.Thread(target=lambda: results.append(client.post(url, json=body)))
    t.start()
    return t


def test_a_full_queue_is_429_with_retry_after_and_a_slow_request_504(registered, tmp_path, held_engine):
    release, started, _ = held_engine
    name = registered[0]["unet"][0]
    app = create_app(settings(tmp_path, [name], max_queue=2, max_batch=1, timeout_s=30))
    url = f"/v1/models/{name}/generate"
    with TestClient(app) as client:
        ready(client)
        results: list = []
        threads = [post_in_thread(client, url, {"n": 1, "seed": i}, results) for i in range(2)]
        assert started.wait(30)
        wait_for(lambda: app.state.server.queues[name].depth == 2, "two requests admitted")
        r = client.post(url, json={"n": 1})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "queue full" and "--max-queue 2" in r.json()["detail"][0]["problem"]
        release.set()
        for t in threads:
            t.join(60)
        assert [x.status_code for x in results] == [200, 200]
        assert 'genflow_serve_request_errors_total{kind="queue_full"' in client.get("/metrics").text
        assert app.state.server.queues[name].depth == 0


def test_a_request_past_its_timeout_is_504_and_its_work_dropped(registered, tmp_path, held_engine):
    release, started, sizes = held_engine
    name = registered[0]["unet"][0]
    app = create_app(settings(tmp_path, [name], max_batch=1, timeout_s=0.5))
    url = f"/v1/models/{name}/generate"
    with TestClient(app) as client:
        ready(client)
        first: list = []
        t = post_in_thread(client, url, {"n": 1}, first)
        assert started.wait(30)
        r = client.post(url, json={"n": 1})    # waits behind the held one, past 0.5 s
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        release.set()
        t.join(60)
        assert first[0].status_code == 504      # it was held past its timeout too
        wait_for(lambda: app.state.server.queues[name].depth == 0, "the queue drained")
        assert sizes == [1]                      # the abandoned request never reached the engine
        assert client.post(url, json={"n": 1}).status_code == 200


def test_concurrent_diffusion_requests_run_as_one_batch_with_their_own_noise(registered, tmp_path, held_engine):
    release, started, sizes = held_engine
    name = registered[0]["unet"][0]
    app = create_app(settings(tmp_path, [name], max_batch=8))
    url = f"/v1/models/{name}/generate"
    bodies = [{"n": 2, "label": i % 3, "steps": 4, "seed": i} for i in range(4)]
    with TestClient(app) as client:
        ready(client)
        results: list = []
        threads = [post_in_thread(client, url, {"n": 1, "steps": 4}, results)]
        assert started.wait(30)
        batched: dict = {}
        for b in bodies:  # queued behind the held batch, then run together
            rs: list = []
            threads.append(post_in_thread(client, url, b, rs))
            batched[b["seed"]] = rs
        wait_for(lambda: app.state.server.queues[name].depth == 5, "five requests admitted")
        release.set()
        for t in threads:
            t.join(60)
        assert sizes == [1, 4]
        for b in bodies:
            alone = client.post(url, json=b).json()["images"]
            together = batched[b["seed"]][0].json()["images"]
            diff = [np.abs(decode(x).astype(int) - decode(y).astype(int)).max() for x, y in zip(alone, together)]
            assert max(diff) <= 16, diff  # one grey level (of 17) at most: float rounding across batch sizes
        assert 'genflow_serve_batch_size_bucket{le="4.0",model="' in client.get("/metrics").text


def test_concurrent_text_requests_with_prompts_of_one_length_share_a_decoding_batch(registered, tmp_path,
                                                                                      held_engine):
    release, started, sizes = held_engine
    name = registered[0]["gpt"][0]
    app = create_app(settings(tmp_path, [name], max_batch=8))
    url = f"/v1/models/{name}/generate"
    bodies = [{"prompt": p, "length": 20, "seed": i, "n": 1 + i % 2} for i, p in enumerate(["ab", "ha", "b ", "gg"])]
    with TestClient(app) as client:
        ready(client)
        first: list = []
        threads = [post_in_thread(client, url, {"prompt": "abc", "length": 20}, first)]
        assert started.wait(30)
        batched: dict = {}
        for b in bodies + [{"prompt": "abcd", "length": 20}]:  # the last one: another prompt length, runs alone
            batched[b.get("seed")] = []
            threads.append(post_in_thread(client, url, b, batched[b.get("seed")]))
        wait_for(lambda: app.state.server.queues[name].depth == 6, "six requests admitted")
        release.set()
        for t in threads:
            t.join(60)
        assert sizes == [1, 4, 1]
        for b in bodies:
            together = batched[b["seed"]][0].json()["texts"]
            assert together == client.post(url, json=b).json()["texts"] and len(together) == b["n"]
            assert all(t.startswith(b["prompt"]) and len(t) == 22 for t in together)


def test_concurrent_masked_lm_requests_share_one_call_per_denoising_step(registered, tmp_path, held_engine):
    release, started, sizes = held_engine
    name = registered[0]["mdlm"][0]
    app = create_app(settings(tmp_path, [name], max_batch=8))
    url = f"/v1/models/{name}/generate"
    bodies = [{"prompt": p, "length": 10, "steps": 4, "seed": i, "n": 1 + i % 2}
              for i, p in enumerate(["ab", "ha", "b ", "gg"])]
    with TestClient(app) as client:
        ready(client)
        first: list = []
        threads = [post_in_thread(client, url, {"prompt": "abc", "length": 8, "steps": 4}, first)]
        assert started.wait(30)
        batched: dict = {}
        for b in bodies + [{"prompt": "ab", "length": 10, "steps": 2, "seed": 9}]:  # another K: runs alone
            batched[b["seed"]] = []
            threads.append(post_in_thread(client, url, b, batched[b["seed"]]))
        wait_for(lambda: app.state.server.queues[name].depth == 6, "six requests admitted")
        release.set()
        for t in threads:
            t.join(60)
        # the held first call, then the four of one K in one batch and the other K alone, in the order
        # their threads reached the queue (either may come first)
        assert sizes[0] == 1 and sorted(sizes[1:]) == [1, 4], sizes
        for b in bodies:   # each request's texts are the ones it gets alone
            together = batched[b["seed"]][0].json()["texts"]
            assert together == client.post(url, json=b).json()["texts"] and len(together) == b["n"]
            assert all(t.startswith(b["prompt"]) and len(t) == 12 for t in together)


def test_shadow_runs_the_challenger_beside_the_champion_and_scores_both_texts(registered, tmp_path):
    (_, folder), artifacts = registered[0]["gpt"], registered[1]
    name = unique("shadow")
    register(folder, name, artifacts)
    v2 = register(folder, name, artifacts, alias="challenger")
    app = create_app(settings(tmp_path, [name], shadow=1.0))
    with TestClient(app) as client:
        ready(client)
        wait_for(lambda: client.get("/v1/models").json()[0]["shadow"]["version"] == v2, "the challenger loaded")
        for seed in range(3):
            r = client.post(f"/v1/models/{name}/generate", json={"prompt": "ab", "length": 12, "seed": seed})
            assert r.status_code == 200 and r.json()["version"] == "1"  # the answer is always the champion's
            wait_for(lambda: client.get("/v1/models").json()[0]["shadow"]["requests"] == seed + 1,
                     "the request shadowed")
        shadow = client.get("/v1/models").json()[0]["shadow"]
        assert shadow["last_error"] is None and shadow["last_ms"] > 0
        assert set(shadow["nll_per_char"]) == {"champion_on_challenger", "challenger_on_champion"}
        assert all(0 < v < 10 for v in shadow["nll_per_char"].values())
        metrics = client.get("/metrics").text
        assert f'genflow_serve_shadow_seconds_count{{model="{name}",version="{v2}"}} 3.0' in metrics
        assert (f'genflow_serve_shadow_nll_per_char_count{{author="challenger",model="{name}",scorer="champion"}} 3.0'
                in metrics)
        assert f'genflow_serve_model_swaps_total{{alias="challenger",model="{name}"}} 1.0' in metrics


def test_text_nll_is_the_models_own_cross_entropy_on_the_generated_characters(registered):
    from components.inference import load_engine
    from components.serving.shadow import text_nll

    engine = load_engine(registered[0]["gpt"][1], threads=1)
    text = engine.sample_text("ab", length=12, count=1, seed=0, temperature=1.0)[0]  # within the context (16)
    ids = engine.tokenizer.encode(text)
    logits, _ = engine.forward(ids[None, :-1], engine.empty_past(1))
    z = logits[0].astype(np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    want = -logp[np.arange(len(ids) - 1), ids[1:]][1:].mean()  # targets after the 2-character prompt
    assert abs(text_nll(engine, "ab", text) - want) < 1e-9
    assert text_nll(engine, "ab", "ab") is None
    long = engine.sample_text("ab", length=60, count=1, seed=1)[0]  # past the context: the last 16 are scored
    assert 0 < text_nll(engine, "ab", long) < 10


# ---------------------------------------------------------------------------
# An unreachable registry
# ---------------------------------------------------------------------------

def test_an_unreachable_registry_keeps_serving_and_is_logged_once(registered, tmp_path, caplog):
    name = registered[0]["gpt"][0]
    app = create_app(settings(tmp_path, [name]))
    follower = app.state.server.follower
    with TestClient(app) as client:
        ready(client)
        last_ok = served = None
        caplog.set_level(logging.INFO, logger="genflow.serve")
        real_client = follower.client

        def refused():
            raise ConnectionError("Connection refused (127.0.0.1:5000)")

        follower.client = refused
        polls = follower.registry.polls
        wait_for(lambda: follower.registry.polls >= polls + 5, "five failed polls")
        rows = client.get("/v1/models").json()
        last_ok, served = rows[0]["last_successful_poll"], rows[0]["version"]
        assert rows[0]["registry_reachable"] is False and last_ok
        assert client.get("/readyz").status_code == 200
        assert client.post(f"/v1/models/{name}/generate", json={"length": 3}).status_code == 200
        assert "genflow_serve_registry_up 0.0" in client.get("/metrics").text
        warnings = [r for r in caplog.records if "registry unreachable" in r.getMessage()]
        assert len(warnings) == 1 and "Connection refused" in warnings[0].getMessage()
        follower.client = real_client
        wait_for(lambda: follower.registry.reachable, "the registry back")
        assert any("registry reachable again" in r.getMessage() for r in caplog.records)
        assert served == "1"
