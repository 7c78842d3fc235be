"""One training loop for every family: AdamW, warmup + cosine learning rate, gradient clipping,
EMA weights, checkpoints with exact resume, and a time or step budget.

    model, result = train(model, get_batch, loss_fn, cfg, out_dir, items_per_batch=64, name="digits-unet")

Determinism: step k draws its batch and noise from a fresh ``torch.Generator`` seeded from
(cfg.seed, k), and the global RNG (dropout) is reseeded the same way, so a run resumed from a
checkpoint at step k ends with the same weights as an uninterrupted one. The cosine schedule
follows whichever budget binds first: steps (reproducible) or wall-clock seconds (the schedule,
and where training stops, then depend on the machine's speed; set ``max_seconds: 0`` for
bit-reproducible runs, or replay a recorded schedule, below).

Replay: every run writes the learning rate it used at each step, with its thread count, to
``out_dir/schedule.json``. With ``GENFLOW_REPLAY_SCHEDULE`` naming such a file, training uses those
rates and stops after that many steps, whatever the clock says: a wall-clock-budgeted run is then
repeated bit for bit on any machine (same seed, threads and library versions), which is what
``genflow reproduce`` does.

Device and precision (``train.device``, ``train.precision``; components.device): the model moves
once to the resolved device, each step's batch is drawn on the CPU and moved once, and on a GPU the
loss's noise comes from a generator on that GPU seeded from (cfg.seed, step). bf16 and fp16 run the
forward pass under autocast (fp16 with a GradScaler); weights, EMA and checkpoints stay fp32, and
checkpoints hold CPU tensors. On the CPU in fp32 nothing differs from a loop without these steps.

Several processes (``cfg.processes > 1``, started by torchrun; see components.distributed): the
model is wrapped in DistributedDataParallel, every rank draws the same global batch from the
step's generator and trains on its rows ``rank::world``, so the ranks together see the batch a
single process would; gradients are averaged by DDP. The loss's own randomness (diffusion
noise, dropout) comes from a generator seeded from (cfg.seed, step, rank). Training under N
processes therefore equals single-process training up to float summation order when the loss
draws no randomness, and is exactly reproducible and resumable for a given N otherwise. Only
rank 0 writes checkpoints, prints and logs to MLflow; a checkpoint is read by rank 0 and sent to
every rank, so resume needs no shared disk.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from components import distributed, interrupt
from components.config import TrainConfig
from components.device import Placement, cpu_state, resolve, to_device
from components.errors import CheckpointError, ConfigError
from components.faults import kill_point
from components.files import atomic_file, write_json
from components.layout import CHECKPOINT_DIR, CHECKPOINT_NAME

CKPT_NAME = CHECKPOINT_NAME
SCHEDULE_NAME = "schedule.json"
DEFAULT_ADAM_BETA2 = 0.999   # torch.optim.AdamW's own
REPLAY_ENV = "GENFLOW_REPLAY_SCHEDULE"


@dataclass
class TrainResult:
    steps: int                      # optimizer steps done in total (resumed ones included)
    seconds: float                  # training wall time in total (resumed ones included)
    items: int                      # training items seen (images, sequences)
    final_loss: float               # mean loss of the last log window
    items_per_s: float
    resumed_from: Optional[int]     # step of the checkpoint this run resumed from, if any
    losses: list[float] = field(default_factory=list)  # one mean per log window
    lrs: list[float] = field(default_factory=list)     # the learning rate of every step (schedule.json)
    device: str = "cpu"             # where it trained ("cpu", "cuda:0")
    precision: str = "fp32"         # the forward pass's precision (fp32, bf16, fp16)


# ---------------------------------------------------------------------------
# Pieces (small, pure where possible)
# ---------------------------------------------------------------------------

def set_threads(threads: int) -> None:
    """Intra-op threads for evaluation and sampling: `threads`, or every core when 0."""
    torch.set_num_threads(threads if threads > 0 else (os.cpu_count() or 1))


def step_seed(seed: int, step: int) -> int:
    """A well-spread 63-bit seed for one (run seed, step) pair."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup_steps, times a cosine from lr to lr*min_lr_ratio over progress 0..1."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    p = min(max(progress, 0.0), 1.0)
    cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr * warm * cosine


def load_replay(path: Optional[str] = None) -> Optional[list[float]]:
    """The per-step learning rates of a recorded schedule.json (GENFLOW_REPLAY_SCHEDULE), or None."""
    path = path if path is not None else os.environ.get(REPLAY_ENV, "")
    if not path:
        return None
    try:
        lrs = json.loads(Path(path).read_text())["lrs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{REPLAY_ENV}={path}: not a readable schedule.json ({e}); "
                         "unset it to train on the params' own budget") from None
    if not lrs:
        raise ConfigError(f"{REPLAY_ENV}={path}: the schedule has no steps")
    return [float(x) for x in lrs]


def write_schedule(path: Path, lrs: list[float], threads: int, processes: int,
                   device: str = "cpu", precision: str = "fp32") -> None:
    """The learning rate of every step and how (threads and how they were chosen, processes,
    device, precision) they ran: what a replay needs."""
    policy = os.environ.get("GENFLOW_THREAD_POLICY") or f"{threads} thread(s), OMP_WAIT_POLICY=" + \
        os.environ.get("OMP_WAIT_POLICY", "default")
    write_json(path, {"steps": len(lrs), "threads": threads, "processes": processes, "policy": policy,
                      "device": device, "precision": precision, "lrs": lrs}, indent=None)


def budget_progress(step: int, seconds: float, cfg: TrainConfig) -> float:
    """Share of the budget used: the larger of steps/max_steps and seconds/max_seconds (if set)."""
    p = step / cfg.max_steps
    if cfg.max_seconds > 0:
        p = max(p, seconds / cfg.max_seconds)
    return p


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and kernels only, not on biases and norm gains (nanoGPT).

    foreach: the multi-tensor update (torch's default on a GPU) on the CPU too, where torch would
    loop over the tensors in Python; the same arithmetic, bit for bit (test_training checks it).
    Not fused: the fused CPU kernel rounds differently, and recorded runs must replay exactly.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    beta2 = DEFAULT_ADAM_BETA2 if cfg.adam_beta2 is None else cfg.adam_beta2   # unset: as before the key existed
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, beta2), foreach=True)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- d*ema + (1-d)*model, with d warming up as (1+step)/(10+step) so early weights fade fast."""
    d = min(decay, (1 + step) / (10 + step))
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1.0 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def run_fingerprint(model: torch.nn.Module, cfg: TrainConfig, extra: str = "") -> str:
    """What a checkpoint must share with this run to be resumed: the maths, not the budget."""
    maths = {k: v for k, v in dataclasses.asdict(cfg).items()
             if v is not None and k not in ("max_seconds", "checkpoint_every", "log_every", "threads", "processes",
                          "device", "precision")}
    shapes = [(n, list(p.shape)) for n, p in model.state_dict().items()]
    blob = json.dumps([maths, shapes, extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def placement(cfg: TrainConfig, name: str = "") -> Placement:
    """train.device and train.precision resolved on this machine; ConfigError naming the key if it cannot."""
    return resolve(cfg.device, cfg.precision, where=f"models.{name}.train" if name else "train")


def autocast(where: Placement) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16; nothing at all for fp32 (the CPU's fp32 maths stay untouched)."""
    dtype = where.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=where.device.type, dtype=dtype)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_resumable(path: Path, fingerprint: str, log: Callable[[str], None]) -> Optional[dict]:
    """The checkpoint at `path` if it belongs to this run and is unfinished, else None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, overwritten, not a torch file: pickle, zip and EOF errors alike
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}); delete it to "
                              "train from step 0, or put back a good copy to resume") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a genflow training checkpoint (no step recorded); delete it to "
                              "train from step 0")
    if state.get("fingerprint") != fingerprint:
        log(f"{path}: written by a run with other settings or data; starting from step 0")
        return None
    if state.get("finished"):
        return None  # a finished run is not continued: this is a new training run
    return state


def _mlflow_log(name: str, value: float, step: int) -> None:
    """Log to MLflow only if the caller imported it and has a run open (never imports it here)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_metric(name, value, step=step)


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------

def train(model: torch.nn.Module,
          get_batch: Callable[[int, torch.Generator], Any],
          loss_fn: Callable[[torch.nn.Module, Any, torch.Generator], torch.Tensor],
          cfg: TrainConfig, out_dir: Path, *, items_per_batch: int, name: str = "",
          fingerprint: str = "") -> tuple[torch.nn.Module, TrainResult]:
    """Train `model` in place; return the model to evaluate (the EMA copy if cfg.ema_decay > 0).

    get_batch(step, gen) -> batch and loss_fn(model, batch, gen) -> scalar loss must draw all
    their randomness from `gen`. Checkpoints go to out_dir/ckpt/last.pt every
    cfg.checkpoint_every steps and at the end; an unfinished checkpoint with the same settings
    (and the same caller `fingerprint`, e.g. a data hash) is resumed.
    """
    if cfg.max_steps < 1:
        raise ConfigError(f"train.max_steps: must be at least 1, got {cfg.max_steps}")
    where = placement(cfg, name)
    model.to(where.device)            # once; the CPU's model is not touched
    world = distributed.join(model)   # rank 0 of 1, unless started by torchrun with WORLD_SIZE > 1
    device = world.device if world.device is not None else where.device   # torchrun: cuda:LOCAL_RANK
    on_gpu = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if where.precision == "fp16" else None   # fp16 gradients underflow
    torch.set_num_threads(world.threads(cfg.threads))
    torch.use_deterministic_algorithms(True, warn_only=True)   # same seed, same threads -> same weights
    # no NaN-filling of every fresh tensor: nothing here reads memory it did not write (torch's own advice;
    # 0.2-2.2% of a default step, measured interleaved in one process)
    torch.utils.deterministic.fill_uninitialized_memory = False
    replay = load_replay()
    ckpt_path = Path(out_dir) / CHECKPOINT_DIR / CHECKPOINT_NAME

    def log(msg: str) -> None:
        if world.main:  # one voice for all ranks
            print(f"{name} {msg}" if name else msg, flush=True)

    ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
    opt = make_optimizer(model, cfg)
    fp = run_fingerprint(model, cfg, fingerprint)
    step, seconds_before, items, losses, loss_steps, lrs = 0, 0.0, 0, [], [], []
    resumed_from = None

    # rank 0 reads the checkpoint and sends it to the others: every rank resumes from the same state
    state = world.broadcast(load_resumable(ckpt_path, fp, log) if world.main else None)
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])   # moves the optimizer's state onto the parameters' device
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, seconds_before, items, losses = state["step"], state["seconds"], state["items"], list(state["losses"])
        loss_steps = list(state.get("loss_steps", []))
        lrs = list(state.get("lrs", []))
        resumed_from = step
        log(f"resuming from {ckpt_path} at step {step}")
        if state.get("processes", 1) != world.size:
            log(f"the checkpoint was written by {state.get('processes', 1)} process(es), this run has {world.size}: "
                "training continues, but not bit-identically to an uninterrupted run")
        written_on = (state.get("device", "cpu"), state.get("precision", "fp32"))
        if written_on[0].split(":")[0] != device.type or written_on[1] != where.precision:
            log(f"the checkpoint was written on {written_on[0]} in {written_on[1]}, this run uses {device} in "
                f"{where.precision}: training continues, but not bit-identically to an uninterrupted run")
    if on_gpu:
        log(f"training on {device} in {where.precision}")
    if world.size > 1:
        log(f"training on {distributed.describe(world)}, {torch.get_num_threads()} thread(s) each, "
            f"{items_per_batch // world.size} items per rank per step")
    net = distributed.wrap(model, world)   # forward goes through DDP so that backward averages gradients

    t_start = time.perf_counter()

    def elapsed() -> float:  # training seconds, those before a resume included
        return seconds_before + time.perf_counter() - t_start

    def clock() -> float:  # elapsed(), as rank 0 sees it when the clock drives the schedule or the stop
        return world.agree(elapsed()) if cfg.max_seconds > 0 else elapsed()

    if replay is not None:
        log(f"replaying the recorded schedule of {len(replay)} steps ({REPLAY_ENV})")

    def out_of_budget(seconds: float) -> bool:
        if replay is not None:
            return step >= len(replay)
        return step >= cfg.max_steps or (cfg.max_seconds > 0 and seconds >= cfg.max_seconds)

    def checkpoint(finished: bool) -> None:
        if not world.main:
            return
        state = {  # CPU tensors: a checkpoint loads on any machine
            "model": cpu_state(model.state_dict()), "ema": cpu_state(ema.state_dict()) if ema is not None else {},
            "optimizer": cpu_state(opt.state_dict()), "step": step, "seconds": elapsed(), "items": items,
            "losses": losses, "loss_steps": loss_steps, "lrs": lrs, "finished": finished, "fingerprint": fp,
            "processes": world.size, "device": str(device), "precision": where.precision}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        save_checkpoint(ckpt_path, state)

    window: list[torch.Tensor] = []   # the losses since the last log line
    t_window, step_window = time.perf_counter(), step

    model.train()
    seconds = clock()
    while not out_of_budget(seconds):
        if interrupt.stop_requested():   # Ctrl-C: keep what was learnt, resume next time
            checkpoint(finished=False)
            log(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; the next run resumes from it")
            raise interrupt.Interrupted(f"{name or 'training'} interrupted at step {step}")
        # fresh randomness per step: resume at step k replays exactly what step k would have drawn
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        if world.size == 1:
            torch.manual_seed(step_seed(cfg.seed + 1, step))
        else:  # dropout differs between ranks, as it does between the rows of one batch
            torch.manual_seed(distributed.rank_seed(cfg.seed + 1, step, world.rank))
        lr = replay[step] if replay is not None else lr_at(step, budget_progress(step, seconds, cfg), cfg)
        lrs.append(lr)
        for group in opt.param_groups:
            group["lr"] = lr

        batch = get_batch(step, gen)   # the global batch, the same on every rank (drawn on the CPU)
        if world.size > 1:
            batch = distributed.shard(batch, world.rank, world.size, device)   # this rank's rows
            gen = torch.Generator(device=device if on_gpu else "cpu").manual_seed(
                distributed.rank_seed(cfg.seed, step, world.rank))
        elif on_gpu:   # moved once per step; the loss draws its noise on the GPU from a GPU generator
            batch = to_device(batch, device, non_blocking=True)
            gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed + 2, step))
        with autocast(where):
            loss = loss_fn(net, batch, gen)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)   # clip the true gradients
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        if ema is not None:
            ema_update(ema, model, cfg.ema_decay, step)
        step += 1
        items += items_per_batch
        window.append(loss.detach())   # read at the log line: no wait on a GPU's queue every step

        seconds = clock()
        last = out_of_budget(seconds)
        if (cfg.log_every > 0 and step % cfg.log_every == 0) or last:
            now = time.perf_counter()
            rate = (step - step_window) * items_per_batch / max(now - t_window, 1e-9)   # items/s, all ranks
            mean = world.mean(sum(v.item() for v in window) / len(window))   # the global batch's loss
            losses.append(mean)
            loss_steps.append(step)
            if world.main:
                _mlflow_log("train/loss", mean, step)
            total = len(replay) if replay is not None else cfg.max_steps
            left = (total - step) * items_per_batch / max(rate, 1e-9)
            if cfg.max_seconds > 0 and replay is None:
                left = min(left, cfg.max_seconds - seconds)
            log(f"step {step}/{total} | loss {mean:.4f} | lr {lr:.2e} | "
                f"{rate:.0f} items/s | ETA {_fmt_seconds(left)}")
            window, t_window, step_window = [], now, step
        if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and not last:
            checkpoint(finished=False)
            kill_point("train-checkpoint")

    del net   # drop DDP's gradient hooks before the model is handed back
    seconds = elapsed()
    checkpoint(finished=True)
    if world.main:
        write_schedule(Path(out_dir) / SCHEDULE_NAME, lrs, torch.get_num_threads(), world.size,
                       str(device), where.precision)
    result = TrainResult(steps=step, seconds=seconds, items=items,
                         final_loss=losses[-1] if losses else float("nan"),
                         items_per_s=items / seconds if seconds > 0 else 0.0,
                         resumed_from=resumed_from, losses=losses, lrs=lrs,
                         device=str(device), precision=where.precision)
    model.eval()
    return (ema if ema is not None else model), result
