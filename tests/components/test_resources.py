"""Peak resident memory, the matmul peak and the training-throughput probe (tiny sizes, no timing asserts)."""
import numpy as np
import pytest

from components import resources
from components.families.base import probe_train_step


def test_peak_rss_sees_memory_allocated_inside_the_block():
    with resources.peak_rss() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched, alive until the block ends
    assert mem.delta_mb >= 48 and mem.peak_mb >= mem.start_mb + 48
    del block
    with resources.peak_rss() as quiet:
        pass
    assert quiet.delta_mb < 32  # nothing allocated: the earlier peak does not leak in


def test_rss_is_a_positive_number_of_megabytes():
    assert 1 < resources.rss_mb() < 1e6


def test_matmul_peak_is_positive_and_restores_threads():
    import torch

    before = torch.get_num_threads()
    assert resources.matmul_peak_gflops(1, n=128, repeats=2) > 0
    assert torch.get_num_threads() == before


def test_peak_flops_is_cached_per_thread_policy_and_a_loaded_one_only_improves(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(resources, "MATMUL_SIZE", 128)   # tiny probes: the cache is under test, not the peak
    monkeypatch.setattr(resources, "PEAK_SHORT", (64, 2))
    path = tmp_path / resources.PEAK_CACHE

    def edit(**entry):
        cache = json.loads(path.read_text())
        (key, old), = cache.items()
        cache[key] = {**old, **entry}
        path.write_text(json.dumps(cache))

    first = resources.peak_flops(tmp_path, threads=1)
    (entry,) = json.loads(path.read_text()).values()
    assert first > 0 and entry["threads"] == 1 and entry["flops"] == first
    edit(flops=123.0, busy_cores=0.0)   # measured on a quiet machine: used as it is, not measured again
    assert resources.peak_flops(tmp_path, threads=1) == 123.0
    edit(flops=1e18, busy_cores=2.0)    # measured under load: measured again, the best kept
    assert resources.peak_flops(tmp_path, threads=1) == 1e18
    edit(flops=1.0, busy_cores=2.0)
    assert resources.peak_flops(tmp_path, threads=1) > 1.0
    resources.peak_flops(tmp_path, threads=2)   # another thread policy: its own entry
    assert len(json.loads(path.read_text())) == 2
    path.write_text("not json")   # a broken cache is rebuilt, not trusted
    assert resources.peak_flops(tmp_path, threads=1) > 0


def test_mfu_is_achieved_training_flops_over_the_peak():
    metrics = {"perf/flops_per_item": 3e6, "perf/train_items_per_s": 500.0}
    assert resources.training_flops_per_s(metrics) == 1.5e9
    assert resources.mfu(metrics, 3e9) == 0.5
    assert resources.mfu(metrics, 0.0) == 0.0


@pytest.mark.parametrize("backbone", ["unet", "gpt-text", "gpt-image", "mdlm"])
def test_train_step_runs_each_backbone_and_counts_items(backbone):
    import torch

    from components.config import GPTConfig, UNetConfig

    torch.manual_seed(0)
    gpt = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    if backbone == "unet":
        from components.families.diffusion import build_network
        config = {"backbone": "unet", "unet": vars(UNetConfig(channels=[8, 16], time_dim=16, groups=4)),
                  "diffusion": {"timesteps": 20, "schedule": "cosine", "p_uncond": 0.1},
                  "num_classes": 10, "image_size": 8, "channels": 1}
        net, items = build_network(config), 4
    elif backbone == "mdlm":
        from components.models.mdlm import MaskedLM
        config = {"backbone": "mdlm", "gpt": vars(gpt), "masked": {"eps": 1e-3}, "vocab_size": 12, "mask_id": 11}
        net, items = MaskedLM(gpt, 12), 4 * 16
    else:
        from components.models.gpt import GPT
        kind = backbone.split("-")[1]
        cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=65 if kind == "image" else 16)
        config = {"backbone": "gpt", "kind": kind, "gpt": vars(cfg), "vocab_size": 27, "image_size": 8}
        net, items = GPT(cfg, 27), 4 * (64 if kind == "image" else 16)
    step, per_step = probe_train_step(net, config, batch_size=4)
    assert per_step == items
    before = [p.detach().clone() for p in net.parameters()]
    rates = resources.thread_scaling(step, per_step, threads=(1, 2), budget_s=0.05)
    assert set(rates) == {1, 2} and all(r > 0 for r in rates.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the optimiser stepped


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="backbone 'rnn'"):
        probe_train_step(__import__("torch").nn.Linear(2, 2), {"backbone": "rnn"}, 2)


def test_interleaved_seconds_alternates_the_functions_and_takes_each_ones_median(monkeypatch):
    # a fake clock: each call advances it by the seconds its function was given, so no real timing
    clock, calls = [0.0], []
    monkeypatch.setattr(resources.time, "perf_counter", lambda: clock[0])

    def work(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds.pop(0)
        return fn

    out = resources.interleaved_seconds({"a": work("a", [1.0, 9.0, 2.0]), "b": work("b", [5.0, 4.0, 30.0])},
                                        repeats=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]   # side by side, not all of a then all of b
    assert out == {"a": 2.0, "b": 5.0}               # each one's median: one slow round moves neither
