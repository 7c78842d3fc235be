"""Where a training step's time goes, for each default network, and what the loop's changes gained.

    python bench/profile_step.py [--models digits-unet,pydoc-gpt,digits-gpt] [--steps 40] [--rounds 3]
                                 [--threads 2] [--compile]

Each network is built from params.yaml as `genflow run` builds it (its family's model spec,
batches from the prepared train split under --root, prepared there first if missing) and
trained with the pieces of components/training.py, each part timed with perf_counter: data
batch, forward (the loss), backward, grad clip, optimizer, EMA, logging (loss.item(), and every
log_every steps the log line and train/loss to an MLflow run on a SQLite store) and checkpoint
writes (one is timed, counted once every checkpoint_every steps); "Python overhead" is the rest
of the step (seeds, generators, the schedule). Two loops alternate, `--rounds` times, so load
on a shared machine hits both alike:

  before: the loop as it was (AdamW's per-tensor loop, torch's CPU default; loss.item() every step)
  after:  the loop as components/training.py runs it now (make_optimizer: multi-tensor AdamW,
          bit-identical on the CPU, tests/components/test_training.py checks it; the losses read
          at the log line only, which on a GPU saves a wait on its queue every step)

It prints a table of ms and % per part, the MFU of forward + backward alone and of the whole
step (achieved FLOP/s over components.resources.peak_flops under this process's threads and
OpenMP wait policy), the after/before throughput ratio, and the load average.
With --compile it also times torch.compile of the network (compile seconds, compiled step time) and
says whether it pays for itself inside a 270 s budget.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("data batch", "forward", "backward", "grad clip", "optimizer", "EMA", "logging", "checkpoint (amortised)",
         "Python overhead")
BUDGET_S = 270.0   # the default models' train.max_seconds


def prepare(params, keys: list[str], root: Path) -> None:
    """The datasets of `keys`, ingested and prepared under root unless they already are."""
    from components import data

    for name in {params.model(k).dataset for k in keys}:
        if not (root / "data" / "prepared" / name / "manifest.json").exists():
            cfg = params.dataset(name)
            data.ingest(name, cfg, root)
            data.prepare(name, cfg, root)


def setup(params, key: str, root: Path):
    """(net, get_batch, loss_fn, items per batch, FLOPs per item, train config) as families.base.train builds them."""
    import torch

    from components import data
    from components.families.base import backbone

    mc = params.model(key)
    fam = backbone(mc.backbone).family()
    config = fam.model_config(key, mc, data.load_manifest(mc.dataset, root), root)
    get_batch, items = fam.training_data(key, mc, config, root)
    torch.manual_seed(mc.train.seed)
    net = fam.build_network(config)
    return net, get_batch, fam.loss_fn(config), items, fam.flops_per_item(net, config), mc.train


class Timer:
    def __init__(self):
        self.total = {p: 0.0 for p in PARTS}
        self.steps = 0
        self.wall = 0.0

    def ms(self) -> dict[str, float]:
        return {p: 1e3 * v / max(1, self.steps) for p, v in self.total.items()}


def make_loop(net, get_batch, loss_fn, cfg, out_dir: Path, variant: str):
    """A function run(steps, timer) training `net` with the pieces of components/training.py."""
    import mlflow
    import torch

    from components import training
    from components.device import cpu_state

    model = copy.deepcopy(net).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.ema_decay > 0 else None
    if variant == "before":
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))   # CPU default: the per-tensor loop
    else:
        opt = training.make_optimizer(model, cfg)
    state = {"step": 0, "window": []}
    ckpt = out_dir / variant / "last.pt"
    log_every = cfg.log_every if cfg.log_every > 0 else 50
    ckpt_every = cfg.checkpoint_every if cfg.checkpoint_every > 0 else 0

    def save() -> None:
        training.save_checkpoint(ckpt, {"model": cpu_state(model.state_dict()),
                                        "ema": cpu_state(ema.state_dict()) if ema is not None else {},
                                        "optimizer": cpu_state(opt.state_dict()), "step": state["step"]})

    def run(steps: int, timer: Timer) -> None:
        T = timer.total
        timed_before = sum(T.values())
        t_all = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            step = state["step"]
            gen = torch.Generator().manual_seed(training.step_seed(cfg.seed, step))
            torch.manual_seed(training.step_seed(cfg.seed + 1, step))
            lr = training.lr_at(step, step / cfg.max_steps, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            t1 = time.perf_counter()
            batch = get_batch(step, gen)
            t2 = time.perf_counter()
            loss = loss_fn(model, batch, gen)
            t3 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t4 = time.perf_counter()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            t5 = time.perf_counter()
            opt.step()
            t6 = time.perf_counter()
            if ema is not None:
                training.ema_update(ema, model, cfg.ema_decay, step)
            t7 = time.perf_counter()
            state["window"].append(loss.item() if variant == "before" else loss.detach())
            state["step"] = step = step + 1
            if step % log_every == 0:
                mean = sum(v if variant == "before" else v.item() for v in state["window"]) / len(state["window"])
                mlflow.log_metric("train/loss", mean, step=step)   # as training logs to the run
                print(f"\r  step {step} | loss {mean:.4f} | lr {lr:.2e}", end="", file=sys.stderr, flush=True)
                state["window"] = []
            t8 = time.perf_counter()
            T["Python overhead"] += t1 - t0
            T["data batch"] += t2 - t1
            T["forward"] += t3 - t2
            T["backward"] += t4 - t3
            T["grad clip"] += t5 - t4
            T["optimizer"] += t6 - t5
            T["EMA"] += t7 - t6
            T["logging"] += t8 - t7
        wall = time.perf_counter() - t_all
        T["Python overhead"] += wall - (sum(T.values()) - timed_before)   # the loop's own untimed rest
        if ckpt_every:   # one write, counted as the share of a step it costs every checkpoint_every steps
            t = time.perf_counter()
            save()
            share = (time.perf_counter() - t) * steps / ckpt_every
            T["checkpoint (amortised)"] += share
            wall += share
        timer.steps += steps
        timer.wall += wall
    return run


def step_table(key: str, timers: dict[str, Timer], items: int, flops_per_item: float, peak: float) -> float:
    """Print the per-part table of both loops; return the after/before throughput ratio."""
    ms = {v: t.ms() for v, t in timers.items()}
    step_ms = {v: 1e3 * t.wall / max(1, t.steps) for v, t in timers.items()}
    print(f"\n{key}: {items} items per step, {flops_per_item / 1e6:.2f} MFLOP per item (forward + backward)")
    print(f"| {'part':<24} | before ms | before % | after ms | after % |")
    print(f"|{'-' * 26}|----------:|---------:|---------:|--------:|")
    for p in PARTS:
        b, a = ms["before"][p], ms["after"][p]
        print(f"| {p:<24} | {b:9.2f} | {100 * b / step_ms['before']:7.1f}% | {a:8.2f} | "
              f"{100 * a / step_ms['after']:6.1f}% |")
    print(f"| {'whole step':<24} | {step_ms['before']:9.2f} |   100.0% | {step_ms['after']:8.2f} |  100.0% |")
    flop = items * flops_per_item
    for v in ("before", "after"):
        fb = (ms[v]["forward"] + ms[v]["backward"]) / 1e3
        print(f"  {v}: {items / step_ms[v] * 1e3:,.0f} items/s; MFU forward+backward "
              f"{flop / fb / peak:.1%}, whole step {flop / (step_ms[v] / 1e3) / peak:.1%}")
    ratio = step_ms["before"] / step_ms["after"]
    print(f"  after / before throughput: {ratio:.3f}x")
    return ratio


def compile_figures(net, get_batch, loss_fn, cfg, items: int, steps: int) -> None:
    """torch.compile of the network: compile seconds, eager vs compiled ms per forward+backward, and
    whether the gain repays the compile inside BUDGET_S."""
    import torch

    def fb_ms(model, fn, n: int) -> float:
        gen = torch.Generator().manual_seed(0)
        times = []
        for s in range(n):
            batch = get_batch(s, gen)
            t = time.perf_counter()
            fn(model, batch, gen).backward()
            times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
        return 1e3 * statistics.median(times)

    eager = copy.deepcopy(net).train()
    fb_ms(eager, loss_fn, 3)
    eager_ms = fb_ms(eager, loss_fn, steps)
    # the network is compiled, not the loss: the loss draws its noise from a torch.Generator,
    # which would break the graph
    compiled = torch.compile(copy.deepcopy(net).train())
    t = time.perf_counter()
    try:
        fb_ms(compiled, loss_fn, 2)   # the first calls compile forward and backward
    except Exception as e:   # no compiler, an unsupported op: say so, as a figure
        print(f"  torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return
    compile_s = time.perf_counter() - t
    comp_ms = fb_ms(compiled, loss_fn, steps)
    saved = (eager_ms - comp_ms) / 1e3
    steps_in_budget = BUDGET_S / (eager_ms / 1e3)
    verdict = (f"pays back after {compile_s / saved:,.0f} steps of {steps_in_budget:,.0f} in {BUDGET_S:.0f} s"
               if saved > 0 else "never pays back (no faster)")
    print(f"  torch.compile: {compile_s:.1f} s to compile; forward+backward {eager_ms:.2f} ms eager, "
          f"{comp_ms:.2f} ms compiled ({eager_ms / comp_ms:.2f}x); {verdict}")
    compiled_steps = max(0.0, BUDGET_S - compile_s) / (comp_ms / 1e3)
    print(f"  forward+backward steps in {BUDGET_S:.0f} s: compiled / eager = {compiled_steps / steps_in_budget:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--models", default="digits-unet,pydoc-gpt,digits-gpt")
    ap.add_argument("--root", default="",
                    help="project folder holding (or to hold) data/prepared (default: a temp one)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per loop per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the network")
    args = ap.parse_args()

    import torch

    from components.config import load_params
    from components.resources import peak_flops

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)   # as training runs
    torch.utils.deterministic.fill_uninitialized_memory = False
    params = load_params(Path(args.params))
    keys = args.models.split(",")
    import mlflow

    with tempfile.TemporaryDirectory(prefix="genflow-profile-") as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")   # the loss is logged as in a genflow run
        mlflow.set_experiment("profile-step")
        root = Path(args.root or tmp)
        prepare(params, keys, root)
        peak = peak_flops(root, torch.get_num_threads())
        policy = f"{torch.get_num_threads()} thread(s), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}"
        print(f"torch {torch.__version__}; {policy}; matmul peak {peak / 1e9:.1f} GFLOP/s; "
              f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
        ratios = {}
        for key in keys:
            net, get_batch, loss_fn, items, fpi, cfg = setup(params, key, root)
            loops = {v: make_loop(net, get_batch, loss_fn, cfg, Path(tmp) / key, v) for v in ("before", "after")}
            for run in loops.values():
                run(3, Timer())   # warm-up: allocator, thread pool, optimizer state
            timers = {v: Timer() for v in loops}
            with mlflow.start_run(run_name=key):
                for _ in range(args.rounds):
                    for v, run in loops.items():
                        run(args.steps, timers[v])
            print(file=sys.stderr)
            ratios[key] = step_table(key, timers, items, fpi, peak)
            if args.compile:
                compile_figures(net, get_batch, loss_fn, cfg, items, max(5, args.steps // 4))
        print(f"\nload average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}; after/before: "
              + ", ".join(f"{k} {r:.3f}x" for k, r in ratios.items()))


if __name__ == "__main__":
    main()
