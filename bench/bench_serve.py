"""`genflow serve` under load, loopback only: micro-batching on and off, and the raw engine.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_serve.py [--threads 2] [--requests 64] [--seconds 60]

The default networks of params.yaml with random weights (the timing depends on the shapes only)
are exported, registered in a temporary SQLite registry and served by two real `genflow serve`
processes on 127.0.0.1: one with --max-batch 32 and one with --max-batch 1. For digits-unet
(one image per request, DDIM-20, guidance 1) and pydoc-gpt (64 characters) at concurrency 1, 8
and 32 it prints requests/s and p50/p99 latency of each, and for digits-unet the raw engine
called in-process at the mean batch size the batching server formed, and at batch 1 and 32: their
ratio is the most any batching server can gain over its unbatched self on the machine at hand.

Targets (issue 18): at concurrency 32 batching >= 4x the unbatched requests/s for digits-unet;
the server's images/s >= 0.8x the raw engine at the same batch size. Text requests share a
decoding batch when their prompts have the same length (here they do). Every case is bounded by
--requests and --seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT_VOCAB = "".join(map(chr, range(32, 127))) + "\n"


def export_and_register(tmp: Path, uri: str) -> None:
    import mlflow
    import torch

    from components.config import load_params
    from components.export import export_model
    from components.models.gpt import GPT
    from components.models.unet import UNet

    params = load_params(ROOT / "params.yaml")
    du, pg = params.model("digits-unet"), params.model("pydoc-gpt")
    digits = params.dataset(du.dataset)
    torch.manual_seed(0)
    unet = UNet(du.unet, digits.image_size, 1, 10)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    gpt = GPT(pg.gpt, len(TEXT_VOCAB) + 1)
    configs = {
        "digits-unet": (unet, {"backbone": "unet", "family": "diffusion", "image_size": digits.image_size,
                               "num_classes": 10, "levels": digits.levels,
                               "diffusion": {"timesteps": du.diffusion.timesteps, "schedule": du.diffusion.schedule}}),
        "pydoc-gpt": (gpt, {"backbone": "gpt", "family": "transformer", "kind": "text", "vocab": TEXT_VOCAB}),
    }
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("bench-serve", artifact_location=(tmp / "artifacts").as_uri())
    for key, (net, cfg) in configs.items():
        r = export_model(key, net.eval(), cfg, params.export, tmp, exporter="torchscript")
        assert r["passed"], r.get("reason")
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(tmp / "exports" / key), "onnx")
        client.set_terminated(run.info.run_id)
        client.create_registered_model(key)
        mv = client.create_model_version(key, f"runs:/{run.info.run_id}/onnx", run_id=run.info.run_id)
        client.set_registered_model_alias(key, "champion", mv.version)


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        return r.status


def load(url: str, body: dict, concurrency: int, requests: int, seconds: float) -> dict:
    """`requests` POSTs from `concurrency` threads (stopping at `seconds`): req/s, p50, p99 (ms)."""
    latencies, lock, left = [], threading.Lock(), [requests]
    deadline = time.monotonic() + seconds

    def worker():
        while time.monotonic() < deadline:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            t0 = time.perf_counter()
            assert post(url, body) == 200
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"n": len(lat), "rps": len(lat) / wall, "p50": 1e3 * statistics.median(lat),
            "p99": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def raw_rate(engine, batch: int) -> float:
    """Images/s of the engine called in-process with `batch` labels, DDIM-20 (at least 2 s of calls)."""
    labels = [i % 10 for i in range(batch)]
    engine.sample(labels, steps=20, guidance=1.0)
    t0, reps = time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - t0 < 2.0:
        engine.sample(labels, steps=20, guidance=1.0)
        reps += 1
    return reps * batch / (time.perf_counter() - t0)


def batch_totals(metrics_url: str, model: str) -> tuple[float, float]:
    """(requests run, engine calls) so far: the batch-size histogram's sum and count."""
    with urllib.request.urlopen(metrics_url, timeout=30) as r:
        text = r.read().decode()
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in values:
            if line.startswith(f'genflow_serve_batch_size_{part}{{model="{model}"}}'):
                values[part] = float(line.split()[-1])
    return values["sum"], values["count"]


def start(tmp: Path, uri: str, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    log = open(tmp / f"serve-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--threads",
                             str(threads), "--max-batch", str(max_batch), "--max-queue", "256",
                             "--batch-wait-ms", "5", "--poll-seconds", "30"],
                            cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"server on port {port} did not become ready; see {log.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads per server")
    ap.add_argument("--requests", type=int, default=64, help="most requests per case")
    ap.add_argument("--seconds", type=float, default=60, help="most seconds per case")
    a = ap.parse_args(argv)
    import socket

    from components.inference import load_engine

    with tempfile.TemporaryDirectory(prefix="genflow-bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        export_and_register(tmp, uri)
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        servers = {"batched": start(tmp, uri, ports[0], 32, a.threads), "unbatched": start(tmp, uri, ports[1], 1,
                                                                                          a.threads)}
        urls = {"batched": f"http://127.0.0.1:{ports[0]}", "unbatched": f"http://127.0.0.1:{ports[1]}"}
        engine = load_engine(tmp / "exports" / "digits-unet", threads=a.threads, prefer_gpu=False)
        rates: dict[int, float] = {}   # images/s of the raw engine per batch size, each measured once

        def raw_at(batch: int) -> float:
            if batch not in rates:
                rates[batch] = raw_rate(engine, batch)
            return rates[batch]
        cases = {"digits-unet": {"n": 1, "steps": 20, "guidance": 1.0, "seed": 0},
                 "pydoc-gpt": {"prompt": "Return the ", "length": 64, "temperature": 0.8, "seed": 0}}
        print(f"threads={a.threads} per server, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              "(the load generator shares them: figures are noisy)")
        print(f"{'model':<12} {'conc':>4} {'mode':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  note")
        summary = {}
        try:
            for model, body in cases.items():
                for conc in (1, 8, 32):
                    n = max(a.requests if conc > 1 else a.requests // 4, 2 * conc)
                    rows = {}
                    for mode in ("batched", "unbatched"):
                        post(f"{urls[mode]}/v1/models/{model}/generate", body)  # warm-up
                        before = batch_totals(f"{urls['batched']}/metrics", model)
                        rows[mode] = r = load(f"{urls[mode]}/v1/models/{model}/generate", body, conc, n, a.seconds)
                        if mode == "batched":
                            after = batch_totals(f"{urls['batched']}/metrics", model)
                            calls = after[1] - before[1]
                            formed = (after[0] - before[0]) / calls if calls else 1.0
                        print(f"{model:<12} {conc:>4} {mode:<10} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p99']:>8.1f}"
                              + (f"  mean batch {formed:.1f}" if mode == "batched" else ""), flush=True)
                    if model == "digits-unet":
                        b = max(1, round(formed))
                        raw = raw_at(b)
                        ratio = rows["batched"]["rps"] / rows["unbatched"]["rps"]
                        summary[conc] = (ratio, rows["batched"]["rps"] / raw, b)
                        print(f"{'':<12} {conc:>4} {'raw':<10} {raw:>8.1f} {'':>8} {'':>8}  images/s of the engine at "
                              f"batch {b}; batched/unbatched {ratio:.2f}x, "
                              f"server/raw {rows['batched']['rps'] / raw:.2f}x", flush=True)
            # the most any batching can give here: the engine's own gain from batch 1 to the largest batch
            one, full = raw_at(1), raw_at(32)
            ceiling = full / one
            print(f"{'':<12} {'':>4} {'raw':<10} {one:>8.1f} {'':>8} {'':>8}  images/s of the engine at batch 1")
            print(f"{'':<12} {'':>4} {'raw':<10} {full:>8.1f} {'':>8} {'':>8}  images/s of the engine at batch 32: "
                  f"{ceiling:.2f}x batch 1, the ceiling of batched/unbatched on this machine", flush=True)
        finally:
            for proc in servers.values():
                proc.terminate()
                proc.wait(30)
        if 32 in summary:
            ratio, vs_raw, b = summary[32]
            print(f"concurrency 32: batching {ratio:.2f}x unbatched (target 4x: {'met' if ratio >= 4 else 'MISSED'}; "
                  f"the engine's ceiling here {ceiling:.2f}x, {ratio / ceiling:.2f} of it reached); "
                  f"server {vs_raw:.2f}x the raw engine at batch {b} (target 0.8x: "
                  f"{'met' if vs_raw >= 0.8 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
