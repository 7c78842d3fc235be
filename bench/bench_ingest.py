"""Ingest, validate and prepare of a big imagefolder: wall time, images/s and peak memory, the
streaming code of this tree against the code of an older commit, side by side in one run.

    .venv/bin/python bench/bench_ingest.py [--images 20000] [--size 32] [--old-rev 85ef399] [--repeats 1] [--heap]

Makes a synthetic imagefolder in a temporary folder: `--images` RGB PNGs of `--size` x `--size`
pixels in 10 class folders (smooth random colour blobs plus noise: PNG compresses them by about a quarter, not to almost
nothing as it would flat colours), and prints its size on disk. Each variant then runs in a fresh process (so each
peak RSS is its own): the same `components.data.ingest`, `components.validation.validate` (Data Docs
included, as `genflow stage validate` writes them) and `components.data.prepare` that
`genflow stage` calls, on the dataset config below (image_size = --size, 17 levels, channels 3: the
colour is kept, a (N, S, S, 3) array; code from before colour converts to grey, a third of that). The old variant is
`git archive` of --old-rev (default: the last commit before streaming) unpacked into a temporary
folder; nothing of it is imported into this process. Repeats alternate the variants.

Printed per variant: seconds per stage, images/s over the three, peak RSS of the process
(resource.getrusage) and the peak above the RSS after imports (numpy, PIL, pandas and Great
Expectations are imported before the baseline is read, so the difference is what the stages
hold); with --heap, one more run per variant under tracemalloc gives the peak of the Python heap
(numpy's arrays included) per stage (slower: its times are not reported). Last: whether both
variants wrote the same prepared arrays.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "photos"


def make_folder(folder: Path, n: int, size: int, classes: int = 10, seed: int = 0) -> int:
    """n RGB PNGs spread over `classes` folders; returns their bytes on disk."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    total = 0
    for i in range(n):
        cls = folder / f"class_{i % classes}"
        cls.mkdir(parents=True, exist_ok=True)
        cx, cy, r = rng.random(3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.2 * r))[..., None]   # (S, S, 1)
        colour = rng.integers(0, 256, (1, 1, 3))
        px = blob * colour + (1 - blob) * rng.integers(0, 256, (1, 1, 3)) + rng.normal(0, 8, (size, size, 3))
        path = cls / f"img_{i:05d}.png"
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), mode="RGB").save(path)
        total += path.stat().st_size
    return total


def child(code: Path, src: Path, root: Path, size: int, heap: bool) -> None:
    """One variant in this process: imports first, then the three stages; prints one JSON line."""
    import resource
    import tracemalloc

    sys.path.insert(0, str(code))
    import dataclasses

    import great_expectations  # noqa: F401  (imported before the baseline: both variants import it)
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import PIL.Image  # noqa: F401

    from components import data, validation
    from components.config import DatasetConfig, ImageValidationConfig

    colour = {"channels": 3} if "channels" in {f.name for f in dataclasses.fields(DatasetConfig)} else {}
    cfg = DatasetConfig(source=f"imagefolder:{src}", kind="image", image_size=size, levels=17,
                        image_validation=ImageValidationConfig(min_per_class=2), **colour)

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    base = rss_mb()
    seconds, heap_mb = {}, {}
    stages = [("ingest", lambda: data.ingest(NAME, cfg, root)),
              ("validate", lambda: validation.validate(NAME, cfg, root, docs=True)),
              ("prepare", lambda: data.prepare(NAME, cfg, root))]
    for stage, run in stages:
        if heap:
            tracemalloc.start()
        t = time.perf_counter()
        run()
        seconds[stage] = time.perf_counter() - t
        if heap:
            heap_mb[stage] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    md5 = {s: hashlib.md5((root / "data/prepared" / NAME / f"{s}.npz").read_bytes()).hexdigest()
           for s in ("train", "val", "test")}
    with numpy.load(root / "data/prepared" / NAME / "train.npz") as z:
        shape = list(z["x"].shape)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "base_rss_mb": base, "heap_mb": heap_mb,
                      "md5": md5, "shape": shape}))


def run_child(code: Path, src: Path, size: int, heap: bool, work: Path) -> dict:
    root = Path(tempfile.mkdtemp(prefix="root-", dir=work))
    cmd = [sys.executable, __file__, "--child", str(code), "--src", str(src), "--root", str(root), "--size", str(size)]
    out = subprocess.run(cmd + (["--heap"] if heap else []), capture_output=True, text=True, cwd=code,
                         env={**os.environ, "GX_ANALYTICS_ENABLED": "false"})
    shutil.rmtree(root, ignore_errors=True)
    if out.returncode:
        sys.exit(f"variant {code} failed:\n{out.stderr[-3000:]}")
    progress = [line for line in out.stderr.splitlines() if ": decoded " in line or ": ingest copied " in line]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["progress_lines"] = len(progress)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--old-rev", default="85ef399", help="commit of the code to compare against")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--heap", action="store_true", help="also measure the Python heap peak under tracemalloc")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.src, args.root, args.size, args.heap)

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        src = work / "photos"
        t = time.perf_counter()
        nbytes = make_folder(src, args.images, args.size)
        print(f"synthetic imagefolder: {args.images} RGB PNGs {args.size}x{args.size} in 10 classes, "
              f"{nbytes / 2**20:.1f} MiB of files ({nbytes / args.images:.0f} bytes each), "
              f"made in {time.perf_counter() - t:.0f} s", flush=True)
        old = work / "old"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old_rev, "components"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        variants = {"streaming (this tree)": ROOT, f"before ({args.old_rev})": old}
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v, code in variants.items():
                runs[v].append(run_child(code, src, args.size, False, work))
        heap = {v: run_child(code, src, args.size, True, work)["heap_mb"] for v, code in variants.items()} \
            if args.heap else {}

        print(f"\n{'variant':<24} {'ingest s':>9} {'validate s':>11} {'prepare s':>10} {'images/s':>9} "
              f"{'peak RSS MB':>12} {'above imports':>14} {'progress lines':>15}")
        for v, rs in runs.items():
            sec = {s: statistics.median(r["seconds"][s] for r in rs) for s in ("ingest", "validate", "prepare")}
            peak = max(r["peak_rss_mb"] for r in rs)
            above = max(r["peak_rss_mb"] - r["base_rss_mb"] for r in rs)
            print(f"{v:<24} {sec['ingest']:>9.1f} {sec['validate']:>11.1f} {sec['prepare']:>10.1f} "
                  f"{args.images / sum(sec.values()):>9.0f} {peak:>12.0f} {above:>14.0f} {rs[0]['progress_lines']:>15}")
        for v, h in heap.items():
            print(f"Python heap peak, {v}: " + ", ".join(f"{s} {mb:.1f} MB" for s, mb in h.items()))
        same = len({json.dumps(rs[0]["md5"], sort_keys=True) for rs in runs.values()}) == 1
        shapes = {v: tuple(rs[0]["shape"]) for v, rs in runs.items()}
        if len(set(shapes.values())) > 1:   # colour kept here, converted to grey by code from before colour
            print("prepared train arrays differ by design: " + ", ".join(f"{v} {s}" for v, s in shapes.items()))
        else:
            print(f"prepared arrays identical between the variants: {'yes' if same else 'NO'}")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
