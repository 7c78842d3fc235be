"""Masked diffusion LM family end to end on tiny text: train -> model.pt -> load_model -> evaluate."""
import json
import math

import pytest
import torch

from components import data, training
from components.config import load_params
from components.families import mdlm as fam
from components.models.mdlm import MaskedDiffusionError, MaskedLM

KEY = "pydoc-mdlm"


def overrides(**extra) -> list[str]:
    m = f"models.{KEY}"
    base = {"gpt.n_layer": 1, "gpt.n_head": 2, "gpt.n_embd": 16, "gpt.block_size": 24,
            "train.max_steps": 3, "train.max_seconds": 0, "train.batch_size": 4, "train.warmup_steps": 1,
            "train.log_every": 1, "train.checkpoint_every": 0, "train.threads": 1,
            "sample.steps": 4, "sample.length": 16, "sample.prompt": "Return",
            "eval.text_samples": 2, "eval.sampler_sweep": "[k2, k16]", "eval.ngram_orders": "[1, 2, 3]"}
    base.update(extra)
    return [f"{m}.{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, project_root, tiny_corpus):
    root = tmp_path_factory.mktemp("mdlm")
    params = load_params(project_root / "params.yaml", [
        f"datasets.pydoc.source=textfile:{tiny_corpus}", "datasets.pydoc.split.test=0.1", *overrides()])
    data.ingest("pydoc", params.dataset("pydoc"), root)
    data.prepare("pydoc", params.dataset("pydoc"), root)
    return root, params


@pytest.fixture(scope="module")
def trained(setup):
    root, params = setup
    return fam.train(KEY, params, root)


def test_the_model_is_declared_off_by_default_with_a_promotion_rule(project_root):
    params = load_params(project_root / "params.yaml")
    for key, metric in ((KEY, "eval/bits_per_char"), ("digits-dit", "eval/fd")):
        assert params.models[key].enabled is False
        assert params.promotion.rules[key].metric == metric
    m = params.models[KEY]
    assert m.family == "diffusion" and m.backbone == "mdlm" and m.dataset == "pydoc"
    assert len(m.sample.prompt) + m.sample.length <= m.gpt.block_size
    fam.check_settings(KEY, m)


def test_train_writes_weights_config_and_metrics(setup, trained):
    root, _ = setup
    assert set(trained) == {"train/loss", "perf/train_seconds", "perf/train_items_per_s", "perf/train_steps",
                            "perf/params", "perf/flops_per_item", "perf/peak_rss_train_mb",
                            "perf/peak_rss_train_delta_mb", "perf/peak_flops", "perf/mfu"}   # memory and MFU too
    assert trained["perf/mfu"] == pytest.approx(trained["perf/flops_per_item"] * trained["perf/train_items_per_s"]
                                                / trained["perf/peak_flops"])
    assert trained["perf/peak_rss_train_mb"] > 0
    assert trained["perf/train_steps"] == 3 and math.isfinite(trained["train/loss"])
    assert trained["perf/flops_per_item"] > 5 * trained["perf/params"]   # forward + backward per token
    assert json.loads((root / "models" / KEY / "train_metrics.json").read_text()) == pytest.approx(trained)
    cfg = json.loads(json.dumps(torch.load(root / "models" / KEY / "model.pt", weights_only=True)["config"]))
    assert cfg["backbone"] == "mdlm" and cfg["family"] == "diffusion" and cfg["kind"] == "text"
    assert cfg["vocab"] == data.load_manifest("pydoc", root)["vocab"]
    assert cfg["vocab_size"] == len(cfg["vocab"]) + 2 and cfg["mask_id"] == cfg["vocab_size"] - 1
    net, config = fam.load_model(KEY, root)
    assert isinstance(net, MaskedLM) and not net.training and config == cfg


def test_evaluate_reports_a_bound_baselines_and_the_k_sweep(setup, trained):
    root, params = setup
    out = fam.evaluate(KEY, params, root)
    assert out["eval/bits_per_char_is_upper_bound"] == 1.0
    assert 0 < out["eval/bits_per_char"] < 2 * math.log2(len(data.load_manifest("pydoc", root)["vocab"]) + 1)
    assert out["eval/bits_per_char_stderr"] > 0
    # the sliding bound sees more text before most characters; a tiny model gains little from it
    assert 0 < out["eval/bits_per_char_sliding"] < 1.1 * out["eval/bits_per_char"]
    assert out["eval/bits_per_char_sliding"] != out["eval/bits_per_char"]
    for name in ("baseline/ngram1_bits_per_char", "baseline/ngram3_bits_per_char", "perf/sample_ms_per_item",
                 "perf/sample_ms_per_item_k2", "perf/sample_ms_per_item_k16", "eval/sample_ngram_bpc_k2",
                 "eval/sample_ngram_bpc_k16", "baseline/real_sample_ngram_bpc"):
        assert math.isfinite(out[name]) and out[name] > 0, name
    assert "perf/sample_ms_per_item_k4" not in out         # the headline K is not part of the sweep here
    report = root / "reports" / KEY
    assert json.loads((report / "metrics.json").read_text()) == pytest.approx(out)
    samples = (report / "samples.txt").read_text()
    assert samples.count("=== sample") == 2 and samples.count("\nReturn") == 2
    rows = json.loads((report / "sampling.json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [2, 4, 16]
    assert out["perf/sample_ms_per_item"] == rows[1]["ms_per_char"]   # the headline is sample.steps = 4
    assert "| 16 |" in (report / "sampling.md").read_text()
    # the bound is estimated from a fixed seed: evaluating again gives the same number
    assert fam.evaluate(KEY, params, root)["eval/bits_per_char"] == out["eval/bits_per_char"]


def test_sample_text_keeps_the_prompt_and_fills_every_position(setup, trained):
    root, _ = setup
    net, config = fam.load_model(KEY, root)
    for steps in (1, 16):
        texts = fam.sample_text(net, config, "Return", 16, steps, num_samples=2, seed=3)
        assert all(t.startswith("Return") and len(t) == 22 for t in texts)


@pytest.mark.parametrize("extra, pattern", [
    ({"masked.eps": 0}, r"^masked.eps: "),
    ({"masked.eps": 1.5}, r"^masked.eps: "),
    ({"sample.steps": 0}, r"^sample.steps: K"),
    ({"eval.sampler_sweep": "[k0]"}, r"^eval.sampler_sweep: k0"),
    ({"sample.length": 40}, r"^models.pydoc-mdlm.sample.length: .* exceed gpt.block_size=24"),
])
def test_bad_settings_fail_before_training(setup, monkeypatch, extra, pattern, project_root, tiny_corpus):
    root, _ = setup
    params = load_params(project_root / "params.yaml", [
        f"datasets.pydoc.source=textfile:{tiny_corpus}", *overrides(**extra)])
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained despite a bad setting"))
    with pytest.raises(ValueError, match=pattern) as e:
        fam.train(KEY, params, root)
    assert "\n" not in str(e.value)
    if "masked.eps" in extra or "sample.steps" in extra:
        assert isinstance(e.value, MaskedDiffusionError)


def test_load_model_without_training_says_what_to_do(tmp_path):
    with pytest.raises(fam.MaskedLMFamilyError, match=r"models/nope/model.pt: not found; run `genflow stage train"):
        fam.load_model("nope", tmp_path)
