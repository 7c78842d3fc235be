"""The measured thread policy (components/threads.py): real probe children, the per-load-class
cache, what the environment or params already decide, and how training reads the choice."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from components import threads
from components.config import load_params
from components.distributed import World

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
TINY_UNET = ["models.digits-unet.unet.channels=[8,16]", "models.digits-unet.unet.time_dim=16",
             "models.digits-unet.unet.groups=4"]


@pytest.fixture
def undecided(monkeypatch):
    """An environment that leaves the choice to the measurement."""
    for name in ("OMP_WAIT_POLICY", "GENFLOW_THREADS", "GENFLOW_THREAD_POLICY", "GENFLOW_REPLAY_SCHEDULE"):
        monkeypatch.setenv(name, "")   # recorded, so that what Choice.apply sets is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setattr(threads, "PROBE_SECONDS", 0.3)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)   # the candidates of a 2-core machine wherever this runs


def test_a_measured_choice_is_the_fastest_candidate_and_is_cached_per_load_class(undecided, tmp_path):
    params = load_params(PARAMS, TINY_UNET)
    lines: list[str] = []
    choice = threads.choose(tmp_path, params, ["digits-unet"], log=lines.append)
    assert choice is not None and choice.source == "measured"
    assert set(choice.rates) == {"1 thread", "2 threads passive", "2 threads spinning"}
    assert all(r > 0 for r in choice.rates.values())
    assert choice.name == max(choice.rates, key=choice.rates.get)
    assert "measuring" in lines[0] and "digits-unet" in lines[0]
    cache = json.loads((tmp_path / threads.CACHE_FILE).read_text())
    (entry,) = cache.values()
    assert entry["threads"] == choice.threads and entry["wait"] == choice.wait and entry["model"] == "digits-unet"

    again = threads.choose(tmp_path, params, ["digits-unet"], log=lines.append)
    if again.source == "cached":            # same load class: no second measurement
        assert (again.threads, again.wait, again.rates) == (choice.threads, choice.wait, choice.rates)
        assert len(lines) == 1
    else:                                   # the load changed class between the calls: measured anew
        assert again.source == "measured" and len(json.loads((tmp_path / threads.CACHE_FILE).read_text())) == 2


def test_the_environment_params_and_a_replay_decide_without_measuring(undecided, tmp_path, monkeypatch):
    params = load_params(PARAMS, ["models.digits-unet.train.threads=1"])
    assert threads.choose(tmp_path, params, ["digits-unet"]) is None          # train.threads set
    params = load_params(PARAMS)
    for name, value in (("GENFLOW_THREADS", "2"), ("OMP_WAIT_POLICY", "PASSIVE"), ("GENFLOW_REPLAY_SCHEDULE", "x")):
        monkeypatch.setenv(name, value)
        assert threads.choose(tmp_path, params, ["digits-unet"]) is None
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert threads.choose(tmp_path, params, ["digits-unet"]).source == "one core"
    assert not (tmp_path / threads.CACHE_FILE).exists()


def test_apply_sets_what_torch_and_the_training_loop_read(undecided, monkeypatch):
    threads.Choice(2, "spinning", "measured", {"1 thread": 10.0, "2 threads spinning": 20.0}).apply()
    assert "OMP_WAIT_POLICY" not in os.environ and os.environ["GENFLOW_THREADS"] == "2"
    assert os.environ["GENFLOW_THREAD_POLICY"].startswith("2 threads spinning (measured: 1 thread 10/s")
    assert World().threads(0) == 2 and World().threads(1) == 1   # train.threads still wins
    assert World(local_size=2).threads(0) == 1                  # ranks share the cores, whatever was chosen
    threads.Choice(1, "PASSIVE", "measured").apply()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and World().threads(0) == 1


def test_busy_cores_is_within_the_machine():
    busy = threads.busy_cores(0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9


def test_every_preset_of_params_yaml_gets_a_probe_its_family_can_train():
    """The probe builds each model of the shipped params.yaml from params alone (no data) and its
    family runs a training step on it: a family whose spec needs more than the generic keys (the
    prompt models' token ids) would otherwise fail every probe and train on one thread."""
    import torch

    from components.families.base import probe_train_step
    from components.families.registry import backbone

    params = load_params(PARAMS)
    tried = []
    for key in params.models:
        mc = params.model(key)
        if params.dataset(mc.dataset).image_size > 8:   # the 32x32 colour presets: seconds of CPU per step
            continue
        config = threads.probe_config(params, key)
        torch.manual_seed(0)
        net = backbone(mc.backbone).family().build_network(config)
        step, items = probe_train_step(net, config, batch_size=2)
        step()
        assert items > 0, key
        tried.append(key)
    assert {"digits-unet", "pydoc-gpt", "captions-unet", "captions-encdec", "pydoc-seq2seq"} <= set(tried)
