"""Training on several processes: torch.distributed data parallelism (DDP), launched by torchrun.

    train.processes: 2   # in params.yaml: two processes, one shard of every batch each

How a run with ``train.processes > 1`` goes:

1. The family's ``train(key, params, root)`` sees it is not inside a distributed run yet
   (``should_launch``) and calls ``launch_params``: the params are written to a temporary YAML
   file and ``python -m torch.distributed.run --standalone --nproc_per_node N -m flows.cli stage
   train KEY --params FILE`` runs in ``root``. Its output is streamed through; rank 0's
   ``models/<key>/train_metrics.json`` is returned, and its ``train/loss`` curve is logged to the
   caller's active MLflow run (the MLflow run stays owned by the calling process).
2. Each of the N processes runs the same ``genflow stage train KEY``. torchrun has set RANK and
   WORLD_SIZE, so the family trains instead of launching again, and ``components.training.train``
   joins the process group (gloo on CPU, NCCL when the model is on a GPU), wraps the model in
   DistributedDataParallel and gives each rank the rows ``rank::world`` of the global batch.
   Only rank 0 writes checkpoints, log lines, model.pt and train_metrics.json.

On a cluster, run step 2 yourself (``torchrun --nnodes ... -m flows.cli stage train KEY``): a
process started by torchrun never launches again, and the world size torchrun gives wins over
``train.processes``.

Torch is imported inside functions: the CLI imports the families' modules lazily, but keep this
module as light as components.config in case it is imported early.
"""
from __future__ import annotations

import atexit
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from components.errors import ConfigError
from components.layout import Layout

PROJECT_DIR = Path(__file__).resolve().parents[1]   # holds components/ and flows/: the child's import path
# torchrun's agent reporting a failed rank, e.g. "E1127 01:12:15.383000 28120 .../elastic/multiprocessing/api.py:1002]"
AGENT_FAILURE = re.compile(r"^[EW]\d{4} [\d:.]+ \d+ \S*torch/distributed/elastic/")


class DistributedError(ConfigError):
    """Distributed training cannot run as asked; the message names the setting and what to do."""


# ---------------------------------------------------------------------------
# Where this process stands
# ---------------------------------------------------------------------------

def inside_distributed_run() -> bool:
    """True in a process started by torchrun (or any launcher that sets WORLD_SIZE), or once a group exists."""
    if "WORLD_SIZE" in os.environ:
        return True
    dist = _torch_distributed()
    return dist is not None and dist.is_available() and dist.is_initialized()


def should_launch(processes: int) -> bool:
    """True when the settings ask for several processes and this one was not started by a launcher."""
    return processes > 1 and not inside_distributed_run()


def is_main_process() -> bool:
    """Rank 0 (or a plain single process): the one that writes files and logs."""
    dist = _torch_distributed()
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _torch_distributed():
    """torch.distributed if torch is already imported (never imports torch just to ask)."""
    return sys.modules.get("torch.distributed") if "torch" in sys.modules else None


# ---------------------------------------------------------------------------
# The process group, as the training loop sees it
# ---------------------------------------------------------------------------

@dataclass
class World:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""
    rank: int = 0
    size: int = 1
    local_size: int = 1      # processes on this machine (they share its cores)
    device: Any = None       # torch.device the rank computes on

    @property
    def main(self) -> bool:
        return self.rank == 0

    def threads(self, configured: int) -> int:
        """train.threads if set, else the measured choice (GENFLOW_THREADS, components/threads.py)
        when this process trains alone, else this machine's cores shared among its ranks."""
        if configured > 0:
            return configured
        chosen = os.environ.get("GENFLOW_THREADS", "")
        if chosen.isdigit() and int(chosen) > 0 and self.local_size == 1:
            return int(chosen)
        return max(1, (os.cpu_count() or 1) // self.local_size)

    def mean(self, value: float) -> float:
        """The average of `value` over all ranks (each rank holds the mean of an equal shard)."""
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.size

    def agree(self, value: float) -> float:
        """Rank 0's `value` on every rank: decisions taken from a clock (lr, stop) must match."""
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.broadcast(t, src=0)
        return float(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's picklable `obj` on every rank (e.g. the checkpoint to resume from)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def _comm_device(self):
        import torch
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")


def join(model) -> World:
    """This process's World for training `model`: joins torch.distributed when launched with WORLD_SIZE > 1.

    An existing process group is used as it is; otherwise one is started from torchrun's
    environment (env://) with gloo for a model on the CPU and NCCL for one on a GPU, and kept
    until the process exits (a group started again in the same process may read the previous
    one's addresses from torchrun's store). With NCCL the model moves to cuda:LOCAL_RANK.
    """
    import torch
    import torch.distributed as dist

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    initialised = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device)
    if not dist.is_available():
        raise DistributedError("train.processes: this PyTorch build has no torch.distributed; "
                               "install a build with it or set train.processes: 1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)   # one GPU per rank on this machine
        torch.cuda.set_device(device)
        model.to(device)
    if not initialised:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
        atexit.register(_end_group)
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))), device=device)


def _end_group() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model, world: World):
    """The module to call forward on: DistributedDataParallel around `model` when there are several ranks."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [world.device] if world.device is not None and world.device.type == "cuda" else None
    # construction broadcasts rank 0's weights and buffers, so every rank starts from the same point
    return DistributedDataParallel(model, device_ids=ids)


# ---------------------------------------------------------------------------
# Data: one global batch per step, one shard per rank
# ---------------------------------------------------------------------------

def shard(batch: Any, rank: int, size: int, device: Any = None) -> Any:
    """Rows rank::size of every tensor in `batch` (tensor, tuple, list or dict of them).

    Every rank draws the same global batch from the step's generator and keeps its own rows, so
    the ranks together see exactly the batch a single process would.
    """
    import torch

    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        if batch.size(0) % size:
            raise DistributedError(f"train.batch_size: a batch of {batch.size(0)} rows cannot be split evenly "
                                   f"over {size} processes; use a multiple of {size} or change train.processes")
        rows = batch[rank::size]
        return rows.to(device) if device is not None and device.type != "cpu" else rows
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):       # namedtuple
        return type(batch)(*(shard(b, rank, size, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b, rank, size, device) for b in batch)
    if isinstance(batch, dict):
        return {k: shard(v, rank, size, device) for k, v in batch.items()}
    return batch


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A well-spread 63-bit seed for one (run seed, step, rank): each rank's own noise and dropout."""
    digest = hashlib.blake2b(f"{seed}:{step}:rank{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------
# Launching: one torchrun per training run
# ---------------------------------------------------------------------------

def torchrun_command(key: str, params_path: str | Path, overrides: list[str], processes: int) -> list[str]:
    """The command that trains model `key` on `processes` local processes (run it in the project root)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "flows.cli", "stage", "train", key, "--params", str(Path(params_path).resolve())]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def launch(key: str, params_path: str | Path, overrides: list[str], root: Path, processes: int) -> dict:
    """Train model `key` on `processes` processes with torchrun; return the metrics rank 0 wrote.

    Runs in `root` (data/ and models/ are read and written there). Rank 0's output is printed
    line by line as it comes; a failure raises DistributedError with the error that stopped it.
    """
    if processes < 1:
        raise DistributedError(f"models.{key}.train.processes: must be at least 1, got {processes}")
    root = Path(root).resolve()
    metrics_path = Layout(root).model_dir(key) / "train_metrics.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
    # torchrun sets one OpenMP thread per process unless told; the loop sets torch's threads itself
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # spinning threads starve the other ranks on shared cores
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)                       # the children get theirs from torchrun

    started = time.time()
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(torchrun_command(key, params_path, overrides, processes), cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        echo = True
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if AGENT_FAILURE.match(line) and not os.environ.get("GENFLOW_DEBUG"):
                echo = False                       # torchrun's failure report: the error below says it in one line
            if echo and not line.startswith(f"train {key}: done"):   # each rank's CLI says so; the caller once
                print(line, end="", flush=True)    # print, not write: a Prefect task captures it
        code = proc.wait()
    finally:
        if proc.poll() is None:                    # interrupted here: stop torchrun, which stops its ranks
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code != 0:
        raise DistributedError(f"models.{key}: training on {processes} processes failed (exit code {code}): "
                               f"{_root_cause(list(tail))}")
    if not metrics_path.exists() or metrics_path.stat().st_mtime < started - 1:
        raise DistributedError(f"{metrics_path}: not written by the {processes}-process run; its family's train() "
                               "must write train_metrics.json on rank 0")
    metrics = json.loads(metrics_path.read_text())
    _log_loss_curve(Layout(root).model_dir(key))
    return metrics


def launch_params(key: str, params, root: Path) -> dict:
    """launch() for a Params object already in memory (overrides and --quick applied): the children
    read exactly these settings from a temporary YAML file."""
    import yaml

    train = params.model(key).train
    processes = train.processes
    if train.batch_size % processes:   # refused here, before any process starts
        raise DistributedError(f"models.{key}.train.batch_size: {train.batch_size} cannot be split evenly over "
                               f"{processes} processes (train.processes); use a multiple of {processes}")
    fd, tmp = tempfile.mkstemp(prefix=f"genflow-{key}-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(params.to_dict(), f, sort_keys=False)
        return launch(key, tmp, [], root, processes)
    finally:
        os.unlink(tmp)


def _root_cause(lines: list[str]) -> str:
    """The error that stopped a rank: genflow's one-line message, else the last Python error line
    (torchrun's own summary, ChildFailedError, skipped), else the last line of output."""
    for line in reversed(lines):
        if line.startswith("genflow stage: "):
            return line[len("genflow stage: "):].strip()
    pattern = re.compile(r"^\s*([\w.]+(?:Error|Exception|Interrupt)\b.*)$")
    for line in reversed(lines):
        m = pattern.match(line)
        if m and "ChildFailedError" not in m.group(1) and not m.group(1).startswith("torch.distributed.elastic"):
            return m.group(1).strip()
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")


def _log_loss_curve(model_dir: Path) -> None:
    """Log the run's train/loss windows (kept in the final checkpoint) to the caller's active MLflow run."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return
    import torch

    from components.layout import CHECKPOINT_DIR, CHECKPOINT_NAME

    path = model_dir / CHECKPOINT_DIR / CHECKPOINT_NAME
    if not path.exists():
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    for step, loss in zip(state.get("loss_steps", []), state.get("losses", [])):
        mlflow.log_metric("train/loss", float(loss), step=int(step))


def describe(world: Optional[World]) -> str:
    """'2 processes (gloo)' for log lines; '' for a single process."""
    if world is None or world.size == 1:
        return ""
    dist = _torch_distributed()
    backend = dist.get_backend() if dist is not None and dist.is_initialized() else "?"
    return f"{world.size} processes ({backend})"
