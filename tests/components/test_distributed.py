"""Training on 2 CPU processes (torchrun, gloo): same weights as 1 process, exact resume, one writer.

This file is also the workers' script: ``python -m torch.distributed.run --nproc_per_node 2
tests/components/test_distributed.py OUT`` runs main() on each rank (see the end of the file).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # when run as the workers' script
    sys.path.insert(0, str(ROOT))

from components import distributed  # noqa: E402
from components.config import Params, TrainConfig, load_params  # noqa: E402
from components.training import CKPT_NAME, train  # noqa: E402

DATA = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
STEPS, BATCH, CRASH_AT = 10, 8, 7
# max |w_2proc - w_1proc| after 10 AdamW steps in float32: the ranks' gradients are means over 4
# rows, summed by all-reduce and halved, instead of one mean over 8 rows, so the float sums run in
# another order (~1e-7 relative per step); Adam's update is ~lr per step whatever the gradient's scale
TOLERANCE = 1e-5


class Crash(RuntimeError):
    pass


def make_model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(dropout), torch.nn.Tanh(),
                               torch.nn.Linear(16, 6))


def get_batch(step, gen):
    return DATA[torch.randint(0, len(DATA), (BATCH,), generator=gen)]


def exact_loss(model, batch, gen):   # no randomness of its own: 2 processes must equal 1
    return ((model(batch) - batch.flip(-1)) ** 2).mean()


def noisy_loss(model, batch, gen):   # draws noise from gen (one stream per rank under DDP)
    noisy = batch + 0.1 * torch.randn(batch.shape, generator=gen)
    return ((model(noisy) - batch) ** 2).mean()


def cfg(**kw):
    base = dict(max_steps=STEPS, max_seconds=0, batch_size=BATCH, lr=1e-2, warmup_steps=3, ema_decay=0.9,
                checkpoint_every=5, log_every=5, seed=3, threads=1, processes=2)
    return TrainConfig(**{**base, **kw})


def crashing_at(step_to_crash):
    def batch(step, gen):
        if step == step_to_crash:   # every rank draws every step's batch: all ranks crash together
            raise Crash(f"simulated crash at step {step}")
        return get_batch(step, gen)
    return batch


# ---------------------------------------------------------------------------
# The workers (run by torchrun)
# ---------------------------------------------------------------------------

def main(out: Path) -> None:
    """Four runs in one torchrun launch; the first starts the process group, the others use it."""
    import torch.distributed as dist

    results = {}
    model = make_model()
    ema, r = train(model, get_batch, exact_loss, cfg(), out / "exact", items_per_batch=BATCH, name="ddp-exact")
    results["exact"] = (model.state_dict(), ema.state_dict(), r.losses, r.steps, r.items)
    # backward on the returned model, as a family's FLOP count does: DDP's hooks must be gone
    exact_loss(model, DATA[:4], None).backward()
    assert dist.is_initialized() and dist.get_world_size() == 2

    model = make_model(dropout=0.2)
    ema, r = train(model, get_batch, noisy_loss, cfg(), out / "straight", items_per_batch=BATCH, name="ddp-straight")
    results["straight"] = (model.state_dict(), ema.state_dict(), r.losses, r.steps, r.resumed_from)

    try:   # checkpoint at step 5, dies at step 7 (a real crash ends the processes; torchrun starts new ones)
        train(make_model(dropout=0.2), crashing_at(CRASH_AT), noisy_loss, cfg(), out / "resumed",
              items_per_batch=BATCH, name="ddp-crash")
    except Crash:
        pass
    model = make_model(dropout=0.2, seed=99)   # another init: the checkpoint must overwrite everything
    ema, r = train(model, get_batch, noisy_loss, cfg(), out / "resumed", items_per_batch=BATCH, name="ddp-resumed")
    results["resumed"] = (model.state_dict(), ema.state_dict(), r.losses, r.steps, r.resumed_from)

    torch.save(results, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.exit(0)


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------

def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One torchrun launch of main() on 2 CPU processes; (results of rank 0 and 1, output, folder)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             __file__, str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:   # a hung rank: SIGTERM makes torchrun stop its workers (each in its own session)
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks, stdout, out


@pytest.mark.integration
def test_two_processes_match_one_process_on_the_same_global_batch(two_processes, tmp_path):
    (rank0, rank1), _, _ = two_processes
    model = make_model()
    ema, single = train(model, get_batch, exact_loss, cfg(processes=1), tmp_path, items_per_batch=BATCH)
    ddp_weights, ddp_ema, ddp_losses, steps, items = rank0["exact"]
    assert steps == single.steps == STEPS and items == single.items == STEPS * BATCH   # global items
    assert max_abs_diff(ddp_weights, model.state_dict()) < TOLERANCE
    assert max_abs_diff(ddp_ema, ema.state_dict()) < TOLERANCE
    assert ddp_losses == pytest.approx(single.losses, abs=1e-6)   # logged loss: the global batch's mean
    assert max_abs_diff(ddp_weights, make_model().state_dict()) > 100 * TOLERANCE   # it did train
    # all-reduce hands every rank the same gradient: the ranks hold identical weights
    assert all(torch.equal(rank0["exact"][0][k], rank1["exact"][0][k]) for k in ddp_weights)


@pytest.mark.integration
def test_resume_under_two_processes_gives_the_same_weights(two_processes):
    (rank0, rank1), _, _ = two_processes
    straight, resumed = rank0["straight"], rank0["resumed"]
    assert straight[4] is None and resumed[4] == 5 and resumed[3] == STEPS
    assert all(torch.equal(straight[0][k], resumed[0][k]) for k in straight[0])
    assert all(torch.equal(straight[1][k], resumed[1][k]) for k in straight[1])   # EMA too
    assert resumed[2] == straight[2]
    assert all(torch.equal(rank1["resumed"][0][k], resumed[0][k]) for k in resumed[0])   # on both ranks
    # each rank draws its own noise and dropout, so a random loss does not replay a 1-process run
    single = make_model(dropout=0.2)
    train(single, get_batch, noisy_loss, cfg(processes=1), two_processes[2] / "single", items_per_batch=BATCH)
    assert max_abs_diff(single.state_dict(), straight[0]) > 100 * TOLERANCE


@pytest.mark.integration
def test_only_rank_zero_logs_and_writes_checkpoints(two_processes):
    _, stdout, out = two_processes
    assert stdout.count("ddp-exact step 5/10 | loss") == 1 and stdout.count("ddp-exact step 10/10") == 1
    assert "ddp-exact training on 2 processes (gloo), 1 thread(s) each, 4 items per rank per step" in stdout
    assert "ddp-resumed resuming from" in stdout and stdout.count("ddp-resumed resuming from") == 1
    for run in ("exact", "straight", "resumed"):
        assert [f.name for f in (out / run / "ckpt").iterdir()] == [CKPT_NAME]   # no other rank's files
    state = torch.load(out / "exact" / "ckpt" / CKPT_NAME, weights_only=True)
    assert state["finished"] and state["step"] == STEPS and state["processes"] == 2
    assert state["loss_steps"] == [5, 10] and len(state["losses"]) == 2


# ---------------------------------------------------------------------------
# Pieces, in one process
# ---------------------------------------------------------------------------

def test_shard_takes_every_world_th_row_of_each_tensor():
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    a = distributed.shard((x, y), 1, 3)
    assert torch.equal(a[0], x[1::3]) and torch.equal(a[1], torch.tensor([1, 4]))
    b = distributed.shard({"x": x, "n": 7}, 0, 2)
    assert torch.equal(b["x"], x[0::2]) and b["n"] == 7
    together = torch.cat([distributed.shard(y, r, 3) for r in range(3)]).sort().values
    assert torch.equal(together, y)   # the ranks together see the whole global batch, once
    with pytest.raises(distributed.DistributedError, match="train.batch_size: a batch of 6 rows cannot be split"):
        distributed.shard(x, 0, 4)


def test_rank_seeds_differ_between_ranks_and_steps():
    seeds = {distributed.rank_seed(0, s, r) for s in range(3) for r in range(4)}
    assert len(seeds) == 12 and all(0 <= s < 2 ** 63 for s in seeds)


def test_launch_only_outside_a_distributed_run(monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.should_launch(2) and not distributed.should_launch(1)
    assert distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")   # torchrun's children never launch again
    monkeypatch.setenv("RANK", "1")
    assert not distributed.should_launch(2) and not distributed.is_main_process()


def test_single_process_world_is_plain(tmp_path):
    world = distributed.join(make_model())
    assert (world.rank, world.size, world.main) == (0, 1, True)
    assert world.mean(2.5) == 2.5 and world.agree(1.0) == 1.0 and world.broadcast({"a": 1}) == {"a": 1}
    assert world.threads(3) == 3 and world.threads(0) == max(1, os.cpu_count() or 1)
    model = make_model()
    assert distributed.wrap(model, world) is model


def test_torchrun_command_reruns_the_train_stage(tmp_path):
    cmd = distributed.torchrun_command("digits-unet", tmp_path / "p.yaml", ["models.digits-unet.train.lr=1e-3"], 4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and "--standalone" in cmd
    tail = cmd[cmd.index("-m", 3):]
    params_file = str((tmp_path / "p.yaml").resolve())
    assert tail == ["-m", "flows.cli", "stage", "train", "digits-unet", "--params", params_file,
                    "--set", "models.digits-unet.train.lr=1e-3"]


def test_params_survive_the_trip_to_the_workers(project_root, tmp_path):
    """launch_params hands the children params.to_dict() as YAML: they must read back the same Params."""
    import yaml

    params = load_params(project_root / "params.yaml", ["models.digits-unet.train.processes=2",
                                                        "models.pydoc-gpt.train.max_steps=7"])
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    again = load_params(path)
    assert isinstance(again, Params) and again == params and again.hash() == params.hash()


def test_failed_launch_names_the_error(tmp_path, monkeypatch, capsys):
    failing = [sys.executable, "-c", "import sys; print('ddp-x step 1/4 | loss 1.0'); "
               "print('genflow stage: models.nope: no such model; known: digits-unet', file=sys.stderr); sys.exit(1)"]
    monkeypatch.setattr(distributed, "torchrun_command", lambda *a: failing)
    with pytest.raises(distributed.DistributedError, match=r"^models\.nope: training on 2 processes failed "
                                                            r"\(exit code 1\): models\.nope: no such model"):
        distributed.launch("nope", tmp_path / "params.yaml", [], tmp_path, 2)
    assert "ddp-x step 1/4" in capsys.readouterr().out               # the ranks' output is streamed through


def test_a_run_that_writes_no_metrics_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "torchrun_command", lambda *a: [sys.executable, "-c", "pass"])
    with pytest.raises(distributed.DistributedError, match="train_metrics.json: not written by the 2-process run"):
        distributed.launch("quiet", tmp_path / "params.yaml", [], tmp_path, 2)


# ---------------------------------------------------------------------------
# A family's train() with train.processes: 2 (launches torchrun, as `genflow stage train` does)
# ---------------------------------------------------------------------------

@pytest.mark.integration
def test_family_train_with_two_processes_launches_torchrun(digits_root, capsys, monkeypatch):
    import mlflow

    from components.config import DatasetConfig, DiffusionConfig, ModelConfig, UNetConfig
    from components.families import diffusion as fam
    from conftest import logged_steps

    root = digits_root   # the same prepared digits as the diffusion family's tests
    dataset = DatasetConfig(source="builtin:digits", kind="image", image_size=8, levels=17)
    model = ModelConfig(family="diffusion", backbone="unet", dataset="digits",
                        unet=UNetConfig(channels=[8, 16], time_dim=16, groups=4),
                        diffusion=DiffusionConfig(timesteps=10),
                        train=TrainConfig(max_steps=4, max_seconds=0, batch_size=8, warmup_steps=1, log_every=2,
                                          checkpoint_every=2, threads=1, processes=2))
    params = Params(datasets={"digits": dataset}, models={"tiny-ddp": model})
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)

    with mlflow.start_run(run_name="ddp-test") as run:             # the session's SQLite store
        metrics = fam.train("tiny-ddp", params, root)
    folder = root / "models" / "tiny-ddp"
    assert metrics == json.loads((folder / "train_metrics.json").read_text())
    assert metrics["perf/train_steps"] == 4 and metrics["perf/flops_per_item"] > 0
    assert torch.load(folder / "ckpt" / CKPT_NAME, weights_only=True)["processes"] == 2
    fam.load_model("tiny-ddp", root)                              # a normal model.pt
    out = capsys.readouterr().out
    assert out.count("tiny-ddp step 2/4 | loss") == 1              # rank 0's lines, streamed through
    assert "training on 2 processes (gloo)" in out
    assert logged_steps(run.info.run_id, "train/loss") == [2, 4]  # the curve, in the caller's MLflow run
