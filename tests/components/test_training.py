"""The shared training loop: exact resume, EMA, schedule, budgets, checkpoints, logging."""
import json
import time

import pytest
import torch

from components.config import TrainConfig
from components.training import CKPT_NAME, REPLAY_ENV, SCHEDULE_NAME, TrainResult, lr_at, train
from conftest import logged_steps

DATA = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))


class Crash(RuntimeError):
    pass


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 6))


def get_batch(step, gen):
    return DATA[torch.randint(0, len(DATA), (8,), generator=gen)]


def loss_fn(model, batch, gen):
    noisy = batch + 0.1 * torch.randn(batch.shape, generator=gen)   # randomness from gen only
    return ((model(noisy) - batch) ** 2).mean()


def cfg(**kw):
    base = dict(max_steps=20, max_seconds=0, batch_size=8, lr=1e-2, warmup_steps=5, ema_decay=0.9,
                checkpoint_every=10, log_every=5, seed=3, threads=1)
    return TrainConfig(**{**base, **kw})


def crashing_at(step_to_crash):
    def batch(step, gen):
        if step == step_to_crash:
            raise Crash(f"simulated crash at step {step}")
        return get_batch(step, gen)
    return batch


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_after_a_crash_gives_the_same_weights(tmp_path):
    straight_model = make_model()
    straight_ema, straight = train(straight_model, get_batch, loss_fn, cfg(), tmp_path / "a", items_per_batch=8)

    with pytest.raises(Crash):  # checkpoint at step 10, dies at step 15
        train(make_model(), crashing_at(15), loss_fn, cfg(), tmp_path / "b", items_per_batch=8)
    resumed_model = make_model(seed=99)  # different init: the checkpoint must overwrite everything
    resumed_ema, resumed = train(resumed_model, get_batch, loss_fn, cfg(), tmp_path / "b", items_per_batch=8)

    assert resumed.resumed_from == 10 and straight.resumed_from is None
    assert resumed.steps == straight.steps == 20 and resumed.items == 160
    assert_same_weights(straight_model, resumed_model)
    assert_same_weights(straight_ema, resumed_ema)
    assert resumed.losses == straight.losses


def test_the_optimizer_steps_bit_for_bit_as_the_per_tensor_adamw():
    """make_optimizer's multi-tensor AdamW gives the weights torch's per-tensor loop gives (what
    runs recorded before it replay with), gradient clipping included."""
    from components.training import make_optimizer

    def weights_after(opt_of):
        model = make_model(seed=1)
        opt = opt_of(model)
        gen = torch.Generator().manual_seed(0)
        for step in range(12):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (step + 1) / 12
            opt.zero_grad(set_to_none=True)
            loss_fn(model, get_batch(step, gen), gen).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        return model

    c = cfg(weight_decay=0.1)
    ours = weights_after(lambda m: make_optimizer(m, c))
    per_tensor = weights_after(lambda m: torch.optim.AdamW(
        [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=c.lr, betas=(0.9, 0.999), foreach=False))
    assert_same_weights(ours, per_tensor)
    assert make_optimizer(make_model(), c).defaults["foreach"] is True


def test_adam_beta2_reaches_the_optimizer_and_unset_keeps_the_hashes_of_before():
    """train.adam_beta2 sets AdamW's second-moment decay and the checkpoint fingerprint (a resume never
    mixes the two); left out it is torch's 0.999 and the params hash (the skip check) does not see it."""
    from pathlib import Path

    from components.config import load_params
    from components.training import make_optimizer, run_fingerprint

    assert make_optimizer(make_model(), cfg()).defaults["betas"] == (0.9, 0.999)
    assert make_optimizer(make_model(), cfg(adam_beta2=0.95)).defaults["betas"] == (0.9, 0.95)
    assert run_fingerprint(make_model(), cfg()) != run_fingerprint(make_model(), cfg(adam_beta2=0.95))
    params_file = Path(__file__).resolve().parents[2] / "params.yaml"
    key = "digits-unet"   # never sets it: its section hashes as it did before the key existed
    plain = load_params(params_file)
    assert plain.model(key).train.adam_beta2 is None
    assert "adam_beta2" not in plain.to_dict()["models"][key]["train"]
    tuned = load_params(params_file, [f"models.{key}.train.adam_beta2=0.95"])
    assert tuned.to_dict()["models"][key]["train"]["adam_beta2"] == 0.95
    assert tuned.section_hash("models", key) != plain.section_hash("models", key)


def test_a_finished_or_foreign_checkpoint_is_not_resumed(tmp_path):
    train(make_model(), get_batch, loss_fn, cfg(), tmp_path, items_per_batch=8)
    _, again = train(make_model(), get_batch, loss_fn, cfg(), tmp_path, items_per_batch=8)
    assert again.resumed_from is None and again.steps == 20       # finished: a new run from step 0

    with pytest.raises(Crash):
        train(make_model(), crashing_at(15), loss_fn, cfg(), tmp_path, items_per_batch=8)
    _, other = train(make_model(), get_batch, loss_fn, cfg(lr=5e-3), tmp_path, items_per_batch=8)
    assert other.resumed_from is None                             # other settings: not this run's checkpoint
    with pytest.raises(Crash):
        train(make_model(), crashing_at(15), loss_fn, cfg(), tmp_path, items_per_batch=8, fingerprint="data-v1")
    _, new_data = train(make_model(), get_batch, loss_fn, cfg(), tmp_path, items_per_batch=8, fingerprint="data-v2")
    assert new_data.resumed_from is None                          # other data: not resumed either


def test_checkpoint_is_complete_and_loads_with_weights_only(tmp_path):
    train(make_model(), get_batch, loss_fn, cfg(), tmp_path, items_per_batch=8)
    files = list((tmp_path / "ckpt").iterdir())
    assert [f.name for f in files] == [CKPT_NAME]                 # no temporary files left behind
    state = torch.load(files[0], weights_only=True)
    assert state["step"] == 20 and state["finished"] is True
    assert {"model", "ema", "optimizer"} <= state.keys()


def test_returns_ema_copy_or_the_model(tmp_path):
    model = make_model()
    ema, result = train(model, get_batch, loss_fn, cfg(), tmp_path / "ema", items_per_batch=8)
    assert isinstance(result, TrainResult)
    assert ema is not model and not ema.training
    assert not torch.equal(ema[0].weight, model[0].weight)
    plain = make_model()
    out, _ = train(plain, get_batch, loss_fn, cfg(ema_decay=0.0), tmp_path / "plain", items_per_batch=8)
    assert out is plain


def test_loss_falls(tmp_path):
    _, result = train(make_model(), get_batch, loss_fn, cfg(max_steps=60, log_every=10), tmp_path, items_per_batch=8)
    assert len(result.losses) == 6
    assert result.final_loss == result.losses[-1] < 0.5 * result.losses[0]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    c = cfg(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, c) == pytest.approx(0.1)
    assert lr_at(9, 0.0, c) == pytest.approx(1.0)
    assert lr_at(50, 0.5, c) == pytest.approx(0.55)
    assert lr_at(100, 1.0, c) == pytest.approx(0.1)
    assert lr_at(500, 3.0, c) == pytest.approx(0.1)


def test_time_budget_stops_training(tmp_path):
    def slow_batch(step, gen):
        time.sleep(0.05)
        return get_batch(step, gen)
    _, result = train(make_model(), slow_batch, loss_fn, cfg(max_steps=10_000, max_seconds=0.3), tmp_path,
                      items_per_batch=8)
    assert 1 <= result.steps < 100
    assert (tmp_path / "ckpt" / CKPT_NAME).exists()


def test_logs_lines_and_mlflow_metrics(tmp_path, capsys):
    import mlflow

    with mlflow.start_run(run_name="training-loop-test") as run:   # the session's SQLite store
        train(make_model(), get_batch, loss_fn, cfg(), tmp_path, items_per_batch=8, name="tiny")
    out = capsys.readouterr().out
    assert "tiny step 5/20 | loss" in out and "items/s" in out and "ETA" in out
    assert logged_steps(run.info.run_id, "train/loss") == [5, 10, 15, 20]


def test_threads_follow_the_config(tmp_path):
    before = torch.get_num_threads()
    try:
        train(make_model(), get_batch, loss_fn, cfg(max_steps=1, threads=1), tmp_path, items_per_batch=8)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)



def test_a_recorded_schedule_replays_a_wall_clock_run_bit_for_bit(tmp_path, monkeypatch):
    """A time-budgeted run stops wherever the clock says; replaying its schedule.json stops at
    the same step with the same learning rates, so the weights are identical."""
    slow = lambda step, gen: (time.sleep(0.01), get_batch(step, gen))[1]  # noqa: E731
    timed = cfg(max_steps=100_000, max_seconds=0.3, checkpoint_every=0)
    first_model, first = train(make_model(), slow, loss_fn, timed, tmp_path / "a", items_per_batch=8)
    record = json.loads((tmp_path / "a" / SCHEDULE_NAME).read_text())
    assert record["steps"] == first.steps == len(first.lrs) == len(record["lrs"])
    assert record["threads"] == 1 and record["lrs"] == first.lrs
    # the cosine followed the clock: the last rate is near the floor although few of 100k steps ran
    assert first.steps < 1000 and record["lrs"][-1] < 0.2 * timed.lr

    monkeypatch.setenv(REPLAY_ENV, str(tmp_path / "a" / SCHEDULE_NAME))
    again_model, again = train(make_model(), get_batch, loss_fn, timed, tmp_path / "b", items_per_batch=8)
    assert again.steps == first.steps and again.lrs == first.lrs
    assert_same_weights(first_model, again_model)

    monkeypatch.setenv(REPLAY_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=f"{REPLAY_ENV}=.*missing.json: not a readable schedule.json"):
        train(make_model(), get_batch, loss_fn, timed, tmp_path / "c", items_per_batch=8)


def test_a_stop_request_checkpoints_and_the_next_run_resumes(tmp_path):
    """Ctrl-C (components.interrupt) reaches the loop in any thread: it saves and stops."""
    from components import interrupt

    straight_model, _ = train(make_model(), get_batch, loss_fn, cfg(), tmp_path / "a", items_per_batch=8)

    def stop_at_7(step, gen):
        if step == 7:
            interrupt.request_stop()
        return get_batch(step, gen)

    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted at step 8"):
            train(make_model(), stop_at_7, loss_fn, cfg(checkpoint_every=0), tmp_path / "b", items_per_batch=8)
    finally:
        interrupt.reset()
    state = torch.load(tmp_path / "b" / "ckpt" / CKPT_NAME, weights_only=True)
    assert state["step"] == 8 and not state["finished"]
    resumed_model, resumed = train(make_model(), get_batch, loss_fn, cfg(), tmp_path / "b", items_per_batch=8)
    assert resumed.resumed_from == 8
    assert_same_weights(straight_model, resumed_model)


@pytest.mark.parametrize("garbage", [b"", b"not a checkpoint \x00\xff" * 50, b"PK\x03\x04 truncated zip"])
def test_a_corrupt_checkpoint_is_refused_in_one_line_naming_it(tmp_path, garbage):
    from components.errors import CheckpointError, GenflowError

    ckpt = tmp_path / "ckpt" / CKPT_NAME
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(garbage)
    with pytest.raises(CheckpointError) as err:
        train(make_model(), get_batch, loss_fn, cfg(), tmp_path, items_per_batch=8)
    message = str(err.value)
    assert isinstance(err.value, GenflowError) and "\n" not in message
    assert str(ckpt) in message and "delete it" in message
    assert ckpt.read_bytes() == garbage                          # refused, not overwritten


def test_a_torch_file_that_is_no_checkpoint_is_refused(tmp_path):
    from components.errors import CheckpointError

    ckpt = tmp_path / "ckpt" / CKPT_NAME
    ckpt.parent.mkdir(parents=True)
    torch.save({"weights": torch.zeros(2)}, ckpt)
    with pytest.raises(CheckpointError, match="not a genflow training checkpoint"):
        train(make_model(), get_batch, loss_fn, cfg(), tmp_path, items_per_batch=8)
