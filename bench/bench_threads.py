"""Training throughput of the default networks under each thread policy, quiet and with a neighbour.

    python bench/bench_threads.py [--models digits-unet,pydoc-gpt] [--seconds 3] [--repeats 3]

OpenMP's wait policy is fixed when a process starts, so every configuration runs in a child
process of its own: 1 thread; 2 threads with OMP_WAIT_POLICY=PASSIVE (threads sleep at once);
2 threads spinning (OpenMP's default); 2 threads spinning briefly (GOMP_SPINCOUNT). Each child does
the model's own training step (components.families.base.probe_train_step) for `--seconds` after a
warm-up and prints items/s.
Configurations alternate, `--repeats` times, and the median is kept, so a burst of other work
hits one round, not one configuration. The same table is then measured with a CPU-bound
neighbour process per core beside it ("loaded"). Ratios are to the best configuration of each
condition: the thread policy genflow should choose is the one near the best in both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {   # name -> (threads, extra environment)
    "1 thread": (1, {}),
    "2 passive": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 spinning": (2, {}),
    "2 spin 20k": (2, {"GOMP_SPINCOUNT": "20000"}),
}
BATCH = {"digits-unet": 64, "digits-dit": 64, "digits-gpt": 16, "pydoc-gpt": 16, "pydoc-mdlm": 32}


def default_config(key: str, params_path: Path) -> dict:
    """The model spec of a default network (params.yaml's shape) without data: the digits' 8x8 x 10
    classes for images, a 100-character vocabulary for text."""
    import dataclasses

    from components.config import load_params
    from components.families.registry import backbone

    mc = load_params(params_path).model(key)
    entry = backbone(mc.backbone)
    config = {"backbone": mc.backbone, "model": key, "kind": "text" if mc.dataset == "pydoc" else "image",
              entry.section: dataclasses.asdict(getattr(mc, entry.section)),
              "diffusion": dataclasses.asdict(mc.diffusion), "masked": dataclasses.asdict(mc.masked),
              "image_size": 8, "channels": 1, "num_classes": 10, "levels": 17}
    config["vocab_size"] = 100 if config["kind"] == "text" else 17 + 10
    config["mask_id"] = config["vocab_size"] - 1
    return config


def child(key: str, threads: int, seconds: float, params_path: Path) -> None:
    import torch

    from components.families.base import probe_train_step
    from components.families.registry import backbone

    torch.set_num_threads(threads)
    config = default_config(key, params_path)
    torch.manual_seed(0)
    net = backbone(config["backbone"]).family().build_network(config)
    step, items = probe_train_step(net, config, BATCH.get(key, 32))
    for _ in range(3):   # warm-up: thread pool, allocator, caches
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    print(json.dumps({"items_per_s": n * items / (time.perf_counter() - t0)}))


def run_child(key: str, threads: int, env: dict, seconds: float, params_path: Path) -> float:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, __file__, "--child", key, str(threads), str(seconds), str(params_path)],
                         env={**base, **env}, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(f"{key} child failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])["items_per_s"]


def neighbours(n: int) -> list[subprocess.Popen]:
    """n CPU-bound processes (a busy loop each), as another job on a shared machine would be."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--models", default="digits-unet,pydoc-gpt")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per child")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--neighbours", type=int, default=0, help="CPU-bound neighbours when loaded (0: one per core)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        key, threads, seconds, params_path = args.child
        return child(key, int(threads), float(seconds), Path(params_path))

    configs = dict(CONFIGS)
    cores = os.cpu_count() or 1
    print(f"{cores} cores; {args.repeats} rounds of {args.seconds:.0f} s per configuration; medians of items/s",
          flush=True)
    for condition in ("quiet", "loaded"):
        procs = neighbours(args.neighbours or cores) if condition == "loaded" else []
        try:
            for key in args.models.split(","):
                rates = {name: [] for name in configs}
                for r in range(args.repeats):
                    for name, (threads, env) in configs.items():
                        rates[name].append(run_child(key, threads, env, args.seconds, Path(args.params)))
                med = {name: statistics.median(v) for name, v in rates.items()}
                best = max(med.values())
                print(f"\n{key}, {condition}" + (f" ({len(procs)} CPU-bound neighbours)" if procs else ""))
                print(f"| {'configuration':<34} | items/s | vs best |")
                print(f"|{'-' * 36}|--------:|--------:|")
                for name, v in med.items():
                    print(f"| {name:<34} | {v:7.0f} | {v / best:6.2f}x |", flush=True)
        finally:
            for p in procs:
                p.kill()


if __name__ == "__main__":
    main()
