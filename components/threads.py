"""The thread policy of a training process, chosen by measuring this machine as it is now.

OpenMP's wait policy is fixed when a process loads it (at ``import torch``). On a quiet machine
spinning threads are fastest (2 threads of the default U-Net 1844 img/s, PASSIVE 779, 1 thread
1279); when other processes share the cores spinning stalls badly (51 img/s against 479 for one
thread). So the CLI chooses before importing torch:

    choice = choose(root, params, ["digits-unet", ...])   # torch-free; children do the measuring
    choice.apply()                                        # OMP_WAIT_POLICY and GENFLOW_THREADS set

Each candidate (1 thread; all cores, PASSIVE; all cores, spinning) runs the first model's own
training step (components.families.base.probe_train_step) in a child process of its own, started
once (alternating rounds of a second each: two, the better kept, on a quiet machine; five, their median, on a busy
one), and the fastest wins. The result is cached in
.genflow/threads.json per machine, library versions, network shape and *load class*: the cores
other processes keep busy right now (read from /proc/stat over 0.3 s, before anything of ours
runs), rounded. So a quiet machine and a
busy one each get their own measured answer, and a run pays the measurement once per class.

Skipped (nothing measured) when the choice is already made: GENFLOW_THREADS or OMP_WAIT_POLICY
in the environment, or ``train.threads`` set for every model to train. The replay of a recorded
run (GENFLOW_REPLAY_SCHEDULE) uses the recorded threads.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from components.files import read_json_cache, write_json
from components.resources import busy_cores

CACHE_FILE = Path(".genflow") / "threads.json"
CACHE_DAYS = 7
PROBE_SECONDS = 2.0          # timed seconds per candidate, over ROUNDS children
ROUNDS = 2
BUSY_ROUNDS = 5                # on a busy machine: more rounds, their median
BATCH = {"image": 64, "text": 16}   # the default models' batch sizes (probe only)
POLICY_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


@dataclass
class Choice:
    threads: int                     # torch intra-op threads for training
    wait: str                        # "PASSIVE" | "spinning" (OpenMP's default)
    source: str                      # measured | cached | one core
    rates: dict[str, float] = field(default_factory=dict)   # candidate -> items/s (measured or cached)
    busy_cores: float = 0.0          # what other processes kept busy when it was chosen

    @property
    def name(self) -> str:
        return candidate_name(self.threads, self.wait)

    def describe(self) -> str:
        table = ", ".join(f"{k} {v:.0f}/s" for k, v in self.rates.items())
        return f"{self.name} ({self.source}" + (f": {table}" if table else "") + \
            f"; {self.busy_cores:.1f} cores busy elsewhere)"

    def apply(self) -> None:
        """Set the environment a torch imported after this reads (this process and its children)."""
        os.environ["GENFLOW_THREADS"] = str(self.threads)
        os.environ["GENFLOW_THREAD_POLICY"] = self.describe()
        if self.wait == "PASSIVE":
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        else:
            os.environ.pop("OMP_WAIT_POLICY", None)


def candidate_name(threads: int, wait: str) -> str:
    return "1 thread" if threads == 1 else f"{threads} threads {'passive' if wait == 'PASSIVE' else 'spinning'}"


def candidates(cores: int) -> list[tuple[int, str]]:
    if cores < 2:
        return [(1, "PASSIVE")]
    return [(1, "PASSIVE"), (cores, "PASSIVE"), (cores, "spinning")]


def probe_config(params: Any, key: str) -> dict:
    """The model spec of `key`'s network from params alone (no data): the dataset's image size and
    levels, ten classes for images, a 100-character vocabulary for text."""
    import dataclasses

    from components.families.registry import backbone

    mc = params.model(key)
    ds = params.dataset(mc.dataset)
    entry = backbone(mc.backbone)
    kind = ds.kind
    config = {"backbone": mc.backbone, "model": key, "kind": kind,
              entry.section: dataclasses.asdict(getattr(mc, entry.section)),
              "diffusion": dataclasses.asdict(mc.diffusion), "masked": dataclasses.asdict(mc.masked),
              "image_size": int(getattr(ds, "image_size", 8) or 8), "channels": 1, "num_classes": 10,
              "levels": int(getattr(ds, "levels", 17) or 17)}
    config.update({s: dataclasses.asdict(getattr(mc, s)) for s in entry.reads if s not in config})  # e.g. condition
    config["vocab_size"] = 100 if kind == "text" else config["levels"] + 10
    config["mask_id"] = config["vocab_size"] - 1
    if kind == "captions":   # prompt-conditioned: the family's own spec (token ids) over a stand-in manifest
        config = entry.family().model_config(key, mc, captions_manifest(ds, config, mc.dataset))
    return config


def captions_manifest(ds: Any, config: dict, name: str) -> dict:
    """What a prepared captions dataset's manifest tells a model spec, from params alone: the
    printable ASCII characters as the vocabulary; a one-character longest caption, which fits any
    text encoder (the probe's prompts are the family's own probe_step's)."""
    return {"name": name, "kind": "captions", "image_size": config["image_size"], "levels": config["levels"],
            "channels": int(ds.channels or 1), "classes": [str(c) for c in range(10)],
            "vocab": "".join(map(chr, range(32, 127))), "max_caption_chars": 1}


def cache_key(config: dict, load_class: int) -> str:
    versions = {p: library_version(p) for p in ("torch", "numpy")}
    blob = json.dumps({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "versions": versions, "config": config, "load": load_class}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def library_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


class Probe:
    """One candidate's child process: imports torch once under the candidate's environment, builds
    the network, then times the training step for each ``run(seconds)`` asked of it (it waits on
    its stdin in between, using no CPU). One child per candidate for all rounds: a busy machine
    takes many rounds, and starting a torch process per round cost minutes there."""

    def __init__(self, config: dict, threads: int, wait: str, extra_env: Optional[dict] = None):
        env = {k: v for k, v in os.environ.items() if k not in POLICY_ENV}
        env.update(extra_env or {})
        if wait == "PASSIVE":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.name = candidate_name(threads, wait)
        self.proc = subprocess.Popen([sys.executable, "-m", "components.threads", json.dumps(config), str(threads)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def run(self, seconds: float, timeout: float = 300.0) -> float:
        """items/s over `seconds` of training steps (after one warm-up step)."""
        try:
            self.proc.stdin.write(f"{seconds}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass   # it died: the read below says how
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()   # it died, or hangs: killed
            err = (self.proc.stderr.read() or "").strip().splitlines()
            why = err[-1] if err else (f"no answer in {timeout:.0f} s" if not ready else f"exit {self.proc.returncode}")
            raise RuntimeError(f"thread probe ({self.name}) failed: {why}")
        return float(json.loads(line)["items_per_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def measure(config: dict, threads: int, wait: str, seconds: float = PROBE_SECONDS,
            extra_env: Optional[dict] = None) -> float:
    """items/s of the network's training step in a child process with this policy (and `extra_env`)."""
    probe = Probe(config, threads, wait, extra_env)
    try:
        return probe.run(seconds)
    finally:
        probe.close()


def choose(root: Path, params: Any, keys: list[str], log: Any = print) -> Optional[Choice]:
    """The policy for training `keys` in this process; None when the environment already decides."""
    cores = os.cpu_count() or 1
    if os.environ.get("GENFLOW_REPLAY_SCHEDULE"):
        return None
    if os.environ.get("GENFLOW_THREADS") or os.environ.get("OMP_WAIT_POLICY"):
        return None
    configured = [params.model(k).train.threads for k in keys]
    if not keys or all(t > 0 for t in configured):
        return None
    if cores < 2:
        return Choice(1, "PASSIVE", "one core")
    busy = busy_cores()
    load_class = int(round(min(busy, cores)))
    config = probe_config(params, keys[0])
    key = cache_key(config, load_class)
    path = Path(root) / CACHE_FILE
    cache = read_json_cache(path)
    hit = cache.get(key)
    if hit and time.time() - float(hit.get("at", 0)) < CACHE_DAYS * 86400:
        return Choice(int(hit["threads"]), str(hit["wait"]), "cached", dict(hit.get("rates", {})), busy)
    log(f"thread policy: measuring {', '.join(candidate_name(*c) for c in candidates(cores))} on "
        f"{keys[0]}'s training step ({busy:.1f} of {cores} cores busy elsewhere) ...")
    # Alternating rounds. Quiet: the best round (a burst of other work hits one round). Busy: the
    # median of more rounds, since the neighbours' share of the cores moves from second to second
    # and a lucky round would rank close candidates wrongly.
    rounds = ROUNDS if load_class == 0 else BUSY_ROUNDS
    seen: dict[str, list[float]] = {}
    probes = [Probe(config, threads, wait) for threads, wait in candidates(cores)]
    try:
        for _ in range(rounds):
            for probe in list(probes):
                try:
                    seen.setdefault(probe.name, []).append(probe.run(PROBE_SECONDS / ROUNDS))
                except (RuntimeError, ValueError) as e:
                    log(f"thread policy: {e}")
                    probes.remove(probe)
    finally:
        for probe in probes:
            probe.close()
    rates = {name: (max(v) if load_class == 0 else statistics.median(v)) for name, v in seen.items() if v}
    if not rates:
        return Choice(1, "PASSIVE", "measured (every probe failed: the safe choice)", {}, busy)
    best = max(rates, key=lambda k: rates[k])
    threads, wait = next(c for c in candidates(cores) if candidate_name(*c) == best)
    choice = Choice(threads, wait, "measured", rates, busy)
    cache[key] = {**asdict(choice), "at": time.time(), "model": keys[0], "load_class": load_class}
    write_json(path, cache, indent=1)
    return choice


def _probe(config: dict, threads: int) -> None:
    """The child: builds the network, then for each line of stdin (seconds) times the training step
    after a warm-up step and prints {"items_per_s"}; ends at EOF."""
    import torch

    from components.families.base import probe_train_step
    from components.families.registry import backbone

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = backbone(config["backbone"]).family().build_network(config)
    step, items = probe_train_step(net, config, BATCH.get(config["kind"], 32))
    for _ in range(2):   # warm-up: thread pool, allocator, caches
        step()
    for line in sys.stdin:
        seconds = float(line)
        step()           # the thread pool wakes up after its wait between rounds
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            n += 1
        print(json.dumps({"items_per_s": n * items / (time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    _probe(json.loads(sys.argv[1]), int(sys.argv[2]))
