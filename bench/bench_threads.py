"""Training throughput of the default networks under each thread policy, quiet and with a neighbour.

    python bench/bench_threads.py [--models digits-unet,pydoc-gpt] [--seconds 3] [--repeats 3]

OpenMP's wait policy is fixed when a process starts, so every configuration runs in a child
process of its own: 1 thread; 2 threads with OMP_WAIT_POLICY=PASSIVE (threads sleep at once);
2 threads spinning (OpenMP's default); 2 threads spinning briefly (GOMP_SPINCOUNT). Each child does
the model's own training step (components.threads.measure) for `--seconds` after a warm-up and
prints items/s. genflow's own choice (components.threads.choose, measured afresh with no cache,
as a `genflow run` does) is printed beside them, with its ratio to the best.
Configurations alternate, `--repeats` times, and the median is kept, so a burst of other work
hits one round, not one configuration. The same table is then measured with a CPU-bound
neighbour process per core beside it ("loaded"). Ratios are to the best configuration of each
condition: the thread policy genflow should choose is the one near the best in both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components import threads  # noqa: E402


def configurations(cores: int) -> dict[str, tuple[int, str, dict]]:
    """name -> (threads, wait policy, extra environment): genflow's candidates and a brief spin."""
    out = {threads.candidate_name(n, wait): (n, wait, {}) for n, wait in threads.candidates(cores)}
    if cores > 1:
        out[f"{cores} threads spin 20k"] = (cores, "spinning", {"GOMP_SPINCOUNT": "20000"})
    return out


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
    args = ap.parse_args()

    from components.config import load_params

    params = load_params(Path(args.params))
    cores = os.cpu_count() or 1
    configs = configurations(cores)
    for k in ("OMP_WAIT_POLICY", "GENFLOW_THREADS", "GENFLOW_THREAD_POLICY"):
        os.environ.pop(k, None)
    print(f"{cores} cores; {args.repeats} rounds of {args.seconds:.0f} s per configuration; medians of items/s",
          flush=True)
    summary = []
    for condition in ("quiet", "loaded"):
        procs = neighbours(args.neighbours or cores) if condition == "loaded" else []
        try:
            for key in args.models.split(","):
                config = threads.probe_config(params, key)
                with tempfile.TemporaryDirectory() as fresh:   # genflow's choice, measured as `genflow run` does
                    choice = threads.choose(Path(fresh), params, [key], log=lambda _: None)
                rates = {name: [] for name in configs}
                for _ in range(args.repeats):
                    for name, (n, wait, env) in configs.items():
                        rates[name].append(threads.measure(config, n, wait, args.seconds, extra_env=env))
                med = {name: statistics.median(v) for name, v in rates.items()}
                best = max(med.values())
                chosen = med[choice.name]
                print(f"\n{key}, {condition}" + (f" ({len(procs)} CPU-bound neighbours)" if procs else ""))
                print(f"| {'configuration':<40} | items/s | vs best |")
                print(f"|{'-' * 42}|--------:|--------:|")
                for name, v in med.items():
                    print(f"| {name:<40} | {v:7.0f} | {v / best:6.2f}x |", flush=True)
                label = f"genflow's choice: {choice.name}"
                print(f"| {label:<40} | {chosen:7.0f} | {chosen / best:6.2f}x |", flush=True)
                summary.append((key, condition, choice.name, chosen / best))
        finally:
            for p in procs:
                p.kill()
    print("\n| model | condition | genflow chose | vs best | within 10% |")
    print("|---|---|---|--:|---|")
    for key, condition, name, ratio in summary:
        print(f"| {key} | {condition} | {name} | {ratio:.2f}x | {'yes' if ratio >= 0.9 else 'NO'} |")


if __name__ == "__main__":
    main()
