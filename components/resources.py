"""What a model costs the machine: peak memory, the machine's matmul peak, training throughput by threads.

    with peak_rss() as mem:                 # peak resident memory of this process inside the block
        train(...)
    mem.peak_mb, mem.delta_mb               # the peak, and how far it rose above the start

    matmul_peak_gflops(threads=2)           # a few large fp32 matmuls: what the cores can do at best
    busy_cores()                            # cores other processes keep busy now (/proc/stat)
    peak_flops(root, threads=2)             # the same in FLOP/s, cached in .genflow/peak.json
    mfu(metrics, peak)                      # a run's achieved training FLOP/s over that peak
    step, items = probe_train_step(net, config, batch_size=64)   # components.families.base
    thread_scaling(step, items, threads=(1, 2))   # {1: items/s, 2: items/s}
    median_seconds(lambda: sample(...))     # wall time of one call: the median of 3

Resident memory is the whole process's (libraries, data, every model it holds), so `delta_mb`
is the nearer figure for what one block adds; allocators keep freed memory, so a block that
reuses it may show a small delta. Timings on a shared machine are noisy: read them as a lead.

torch is imported inside the functions that need it; peak_rss needs only the standard library.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

POLL_INTERVAL_S = 0.02       # resident memory is read this often while a block runs
MATMUL_SIZE = 1024           # n of the n x n fp32 matmuls of the peak probe (2 n^3 = 2.1 GFLOP each)
MATMUL_SIZE_GPU = 4096       # a GPU needs larger matmuls to reach its peak
MATMUL_REPEATS = 10          # the best of this many timings is the peak
PEAK_CACHE = Path(".genflow") / "peak.json"
PEAK_CACHE_DAYS = 7
QUIET_CORES = 0.5            # a peak measured with less than this busy elsewhere is final
PEAK_SHORT = (512, 80)       # on a busy machine also the best of 80 (512 x 512) matmuls (under a second)
TIMING_REPEATS = 3           # median_seconds: the median of this many runs


# Decoding without a cache recomputes the whole prefix at every token (O(T^2)): beyond this many tokens a
# sequence (32x32x3 = 3072 channel values) would spend minutes on that comparison alone, so the no-cache
# figures are left out and the cached one is timed once on one item.
NOCACHE_MAX_TOKENS = 1024


def median_seconds(fn: Callable[[], object], repeats: int = TIMING_REPEATS) -> float:
    """Wall-clock seconds of fn(), the median of `repeats` runs (sampling-speed figures)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_seconds(fns: Mapping[str, Callable[[], object]], repeats: int = TIMING_REPEATS) -> dict[str, float]:
    """Wall-clock seconds of each fn(), timed side by side: `repeats` rounds, each running every
    fn once in turn, then each fn's median. A slow spell of the machine (another process, the CPU
    clocking down) lands on every fn alike instead of on whichever ran during it, so ratios between
    them hold better than with one median_seconds after another."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------
# Resident memory
# ---------------------------------------------------------------------------

def _proc_status_mb(field: str) -> Optional[float]:
    """A kB field of /proc/self/status (VmRSS: now, VmHWM: the peak so far) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Resident memory of this process now, in MB."""
    now = _proc_status_mb("VmRSS")
    if now is not None:
        return now
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return _max_rss_mb()


def _max_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (kB on Linux, bytes on macOS)."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


@dataclass
class PeakRSS:
    """Resident memory of the process in MB: at the start of a block and its peak inside it."""
    start_mb: float = 0.0
    peak_mb: float = 0.0

    @property
    def delta_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)


@contextmanager
def peak_rss(interval_s: float = POLL_INTERVAL_S) -> Iterator[PeakRSS]:
    """Measure the peak resident memory of this process while the block runs.

    A thread reads the resident size every `interval_s`; if the process's all-time peak (VmHWM)
    rose during the block, that peak is exact and wins over the polled one. Nothing is reset,
    so nested or concurrent measurements do not disturb each other.
    """
    report = PeakRSS(start_mb=rss_mb())
    report.peak_mb = report.start_mb
    hwm_start = _max_rss_mb()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            report.peak_mb = max(report.peak_mb, rss_mb())

    thread = threading.Thread(target=poll, name="peak-rss", daemon=True)
    thread.start()
    try:
        yield report
    finally:
        stop.set()
        thread.join()
        report.peak_mb = max(report.peak_mb, rss_mb())
        hwm_end = _max_rss_mb()
        if hwm_end > hwm_start:  # a new all-time peak was set inside the block: it is the block's peak
            report.peak_mb = max(report.peak_mb, hwm_end)


# ---------------------------------------------------------------------------
# Compute: the machine's peak, and a model's training throughput by threads
# ---------------------------------------------------------------------------

def busy_cores(seconds: float = 0.3) -> float:
    """Cores kept busy by other processes over `seconds` (from /proc/stat); 0 where it cannot be read."""
    def sample() -> Optional[tuple[int, int]]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    a = sample()
    time.sleep(seconds)
    b = sample()
    if a is None or b is None or b[0] == a[0]:
        return 0.0
    return (os.cpu_count() or 1) * (1.0 - (b[1] - a[1]) / (b[0] - a[0]))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with n intra-op threads, then restore the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matmul_peak_gflops(threads: Optional[int] = None, n: Optional[int] = None,
                       repeats: int = MATMUL_REPEATS, device: str = "cpu", precision: str = "fp32") -> float:
    """GFLOP/s of the best of `repeats` (n x n) @ (n x n) matmuls with `threads` threads (default: all
    cores), on `device` ("cpu", "cuda:0") in `precision` (fp32, bf16, fp16: what training's matmuls use)."""
    import torch

    threads = threads or os.cpu_count() or 1
    dev = torch.device(device)
    n = n or (MATMUL_SIZE_GPU if dev.type == "cuda" else MATMUL_SIZE)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch_threads(threads), torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(dev, dtype)
        b = torch.randn(n, n, generator=gen).to(dev, dtype)
        a @ b  # warm-up: thread pool, kernels and caches
        sync()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def peak_flops(root: Path, threads: int, device: str = "cpu", precision: str = "fp32") -> float:
    """The matmul peak (matmul_peak_gflops) in FLOP/s under this process's thread policy: `threads`
    threads and the OpenMP wait policy it was started with, on `device` in `precision`.

    Cached in root/.genflow/peak.json per machine, torch version, threads, wait policy, device and
    precision, for PEAK_CACHE_DAYS days. A peak measured while other processes kept the cores busy
    (busy_cores) is too low, and an MFU over it too high: until a quiet measurement is cached, each
    call measures again (about a second; also the best of many short matmuls) and keeps the best.
    """
    import hashlib
    import json
    import platform

    import torch

    from components.files import read_json_cache, write_json

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else \
        (platform.processor() or platform.machine())
    what = {"machine": name, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "wait": os.environ.get("OMP_WAIT_POLICY", "default"), "device": device.split(":")[0],
            "precision": precision}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(root) / PEAK_CACHE
    cache = read_json_cache(path)
    hit = cache.get(key)
    if not (isinstance(hit, dict) and time.time() - float(hit.get("at", 0)) < PEAK_CACHE_DAYS * 86400):
        hit = None
    if hit is not None and float(hit.get("busy_cores", os.cpu_count() or 1)) < QUIET_CORES:
        return float(hit["flops"])
    busy = busy_cores() if device == "cpu" else 0.0
    flops = matmul_peak_gflops(threads, device=device, precision=precision) * 1e9
    if busy >= QUIET_CORES:   # the best of many short matmuls finds moments the cores were free
        n, repeats = PEAK_SHORT
        flops = max(flops, matmul_peak_gflops(threads, n, repeats, device, precision) * 1e9)
    if hit is not None and float(hit["flops"]) >= flops:   # an earlier, less loaded moment was faster
        flops, busy = float(hit["flops"]), float(hit.get("busy_cores", os.cpu_count() or 1))
    cache[key] = {**what, "flops": flops, "busy_cores": busy, "at": time.time()}
    write_json(path, cache, indent=1)
    return flops


def training_flops_per_s(metrics: Mapping[str, float]) -> float:
    """Achieved training FLOP/s of a run: perf/flops_per_item (forward + backward, per image or per
    token) x perf/train_items_per_s (images or tokens per second, in the same unit)."""
    return float(metrics["perf/flops_per_item"]) * float(metrics["perf/train_items_per_s"])


def mfu(metrics: Mapping[str, float], peak: float) -> float:
    """Model FLOP utilisation: achieved training FLOP/s over the peak FLOP/s (peak_flops)."""
    return training_flops_per_s(metrics) / peak if peak > 0 else 0.0


def training_throughput(step: Callable[[], None], items_per_step: int, threads: int, *,
                        budget_s: float = 2.5, min_steps: int = 2, max_steps: int = 15,
                        warmup: bool = True) -> float:
    """Items per second of `step` with `threads` threads: a warm-up step, then steps until
    `max_steps` or `budget_s` seconds (at least `min_steps`)."""
    with torch_threads(threads):
        if warmup:
            step()  # the first step at a thread count pays for the thread pool and caches
        steps, t0 = 0, time.perf_counter()
        while steps < max_steps and (steps < min_steps or time.perf_counter() - t0 < budget_s):
            step()
            steps += 1
        seconds = time.perf_counter() - t0
    return steps * items_per_step / seconds


def thread_scaling(step: Callable[[], None], items_per_step: int, threads: tuple[int, ...] = (1, 2),
                   budget_s: float = 2.5, rounds: int = 3) -> dict[int, float]:
    """{threads: training items/s}: the best of `rounds` interleaved timings per thread count.

    Interleaving and keeping the best make a burst of other work on a shared machine hit one
    round, not one thread count (which would fake a speedup or a slowdown). budget_s is the
    timed seconds per thread count, split over the rounds.
    """
    best = {n: 0.0 for n in threads}
    for r in range(rounds):
        for n in threads:
            rate = training_throughput(step, items_per_step, n, budget_s=budget_s / rounds, min_steps=1,
                                       warmup=r == 0)
            best[n] = max(best[n], rate)
    return best
