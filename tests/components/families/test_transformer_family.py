"""Transformer family end to end on tiny data: train -> model.pt -> load_model -> evaluate, text and digits."""
import json
import math

import numpy as np
import pytest
import torch

from components import data
from components.config import load_params
from components.families import transformer
from components.models.gpt import ContextLengthError
from components.tokenizer import UnknownCharactersError


def tiny_overrides(key: str) -> list[str]:
    m = f"models.{key}"
    return [f"{m}.gpt.n_layer=1", f"{m}.gpt.n_head=2", f"{m}.gpt.n_embd=16",
            f"{m}.train.max_steps=3", f"{m}.train.max_seconds=0", f"{m}.train.batch_size=4",
            f"{m}.train.warmup_steps=1", f"{m}.train.log_every=1", f"{m}.train.checkpoint_every=0",
            f"{m}.train.threads=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, project_root, tiny_corpus):
    root = tmp_path_factory.mktemp("transformer")
    params = load_params(project_root / "params.yaml", [
        f"datasets.pydoc.source=textfile:{tiny_corpus}", "datasets.pydoc.split.test=0.2",
        *tiny_overrides("pydoc-gpt"), "models.pydoc-gpt.gpt.block_size=16",
        "models.pydoc-gpt.sample.length=20", "models.pydoc-gpt.sample.prompt=Return",
        "models.pydoc-gpt.eval.text_samples=2", "models.pydoc-gpt.eval.ngram_orders=[1, 2, 3]",
        *tiny_overrides("digits-gpt"), "models.digits-gpt.eval.num_samples=20",
        "models.digits-gpt.eval.inpaint_samples=10",
    ])
    for name in ("pydoc", "digits"):
        data.ingest(name, params.dataset(name), root)
        data.prepare(name, params.dataset(name), root)
    return root, params


def test_text_model_trains_saves_and_evaluates(setup):
    root, params = setup
    metrics = transformer.train("pydoc-gpt", params, root)
    assert {"train/loss", "perf/train_seconds", "perf/train_items_per_s", "perf/params",
            "perf/flops_per_item"} <= set(metrics)
    assert json.loads((root / "models/pydoc-gpt/train_metrics.json").read_text()) == metrics
    # forward + backward: at least 6 FLOPs per token per matmul weight (all but the LayerNorm gains)
    matmul_params = metrics["perf/params"] - 3 * 16
    assert 6 * matmul_params <= metrics["perf/flops_per_item"] < 6 * matmul_params + 12 * 16 * 16 * 2

    ckpt = torch.load(root / "models/pydoc-gpt/model.pt", weights_only=True)
    cfg = ckpt["config"]
    assert cfg["kind"] == "text" and cfg["vocab"] == data.load_manifest("pydoc", root)["vocab"]
    assert cfg["vocab_size"] == len(cfg["vocab"]) + 1 and cfg["gpt"]["block_size"] == 16

    model, config = transformer.load_model("pydoc-gpt", root)
    assert config == cfg and not model.training
    logits, kv = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, cfg["vocab_size"])

    out = transformer.evaluate("pydoc-gpt", params, root)
    for name in ("eval/bits_per_char", "perf/sample_ms_per_item", "perf/sample_ms_per_token_cached",
                 "perf/sample_ms_per_token_nocache", "baseline/ngram1_bits_per_char",
                 "baseline/ngram3_bits_per_char"):
        assert math.isfinite(out[name]), name
    assert out["perf/sample_ms_per_item"] == out["perf/sample_ms_per_token_cached"]
    assert 0 < out["eval/bits_per_char"] < math.log2(cfg["vocab_size"]) + 1  # barely trained, but sane
    assert json.loads((root / "reports/pydoc-gpt/metrics.json").read_text()) == out
    samples = (root / "reports/pydoc-gpt/samples.txt").read_text()
    assert samples.count("=== sample") == 2 and "\nReturn" in samples


def test_text_sampling_refuses_bad_prompts(setup):
    root, params = setup
    if not (root / "models/pydoc-gpt/model.pt").exists():
        transformer.train("pydoc-gpt", params, root)
    model, config = transformer.load_model("pydoc-gpt", root)
    with pytest.raises(UnknownCharactersError, match="'€'"):
        transformer.sample_text(model, config, "Return €5", 5)
    with pytest.raises(ContextLengthError, match="^prompt: 17 tokens"):
        transformer.sample_text(model, config, "r" * 17, 5)
    text = transformer.sample_text(model, config, "", 10, seed=1)[0]  # empty prompt: starts after a blank line
    assert len(text) == 10


def test_image_model_trains_and_evaluates_on_shared_image_metrics(setup):
    root, params = setup
    metrics = transformer.train("digits-gpt", params, root)
    assert metrics["perf/params"] > 0
    model, config = transformer.load_model("digits-gpt", root)
    assert config["kind"] == "image" and config["vocab_size"] == 17 + 10
    assert abs(sum(config["class_prior"]) - 1) < 1e-9

    images = transformer.sample_images(model, config, np.arange(10), seed=0)
    assert images.shape == (10, 8, 8) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert np.allclose(images * 16, np.round(images * 16))  # on the 17 grey levels

    out = transformer.evaluate("digits-gpt", params, root)
    for name in ("eval/bits_per_dim", "eval/bits_per_dim_conditional", "eval/fd", "eval/class_acc",
                 "baseline/kde_fd", "baseline/uniform_bits_per_dim", "baseline/indep_bits_per_dim",
                 "baseline/logreg_bits_per_dim", "perf/sample_ms_per_item"):
        assert math.isfinite(out[name]), name
    assert out["baseline/uniform_bits_per_dim"] == pytest.approx(math.log2(17))
    assert out["baseline/logreg_bits_per_dim"] < out["baseline/indep_bits_per_dim"] < math.log2(17)
    assert (root / "reports/digits-gpt/samples.png").exists()
    # inpainting: the bottom half only (a raster-order model cannot condition on later pixels)
    for k in ("class_acc", "mse", "consistency"):
        assert math.isfinite(out[f"eval/inpaint_bottom_{k}"]) and f"baseline/nn_inpaint_bottom_{k}" in out
    assert not any(k.startswith(("eval/inpaint_left", "eval/inpaint_centre", "eval/inpaint_random")) for k in out)
    assert "eval/inpaint_class_acc" not in out and out["perf/inpaint_ms_per_item"] > 0


def test_complete_prefix_keeps_the_top_and_refuses_other_masks(setup):
    from components.errors import ModelError
    from components.evaluation.editing import inpaint_masks

    root, params = setup
    model, config = transformer.load_model("digits-gpt", root)
    x, _ = data.load_images("digits", "test", root)
    masks = inpaint_masks(3, 8, 8)
    out = transformer.complete_prefix(model, config, x[:3], masks["bottom"], seed=0)
    assert out.shape == (3, 8, 8)
    np.testing.assert_array_equal(out[:, :4] * 16, x[:3, :4])          # the kept top comes back unchanged
    with pytest.raises(ModelError, match="prefix in raster order"):
        transformer.complete_prefix(model, config, x[:3], masks["left"])


def test_unconditional_bits_per_dim_is_the_mixture_over_classes():
    # two classes, two images: p(x) = sum_c p(c) p(x|c), exactly
    log_lik = np.log(np.array([[0.2, 0.05], [0.01, 0.3]]))
    prior = np.array([0.25, 0.75])
    out = transformer.image_bits_per_dim(log_lik, prior, np.array([0, 1]), dims=4)
    px = np.array([0.25 * 0.2 + 0.75 * 0.05, 0.25 * 0.01 + 0.75 * 0.3])
    assert out["eval/bits_per_dim"] == pytest.approx(-np.log2(px).mean() / 4)
    assert out["eval/bits_per_dim_conditional"] == pytest.approx(-np.log2([0.2, 0.3]).mean() / 4)


def test_image_log_likelihood_matches_the_cached_sampler_distribution():
    # log p(x|c) from one forward pass equals the sum of per-step cached decoding log-probs
    from components.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=5), 3 + 2).eval()
    config = {"levels": 3, "num_classes": 2, "image_size": 2}
    x = np.array([[[0, 1], [2, 1]]], dtype=np.uint8)
    ll = transformer.image_log_likelihoods(model, config, x)  # (1, 2)
    for c in range(2):
        seq = torch.tensor([[3 + c, 0, 1, 2, 1]])
        logits, past = model(seq[:, :1], model.empty_cache(1))
        total = 0.0
        for t in range(1, 5):
            total += torch.log_softmax(logits[0, -1, :3], -1)[seq[0, t]].item()
            logits, past = model(seq[:, t:t + 1], past)
        assert ll[0, c] == pytest.approx(total, abs=1e-5)


def test_load_model_without_training_says_what_to_do(tmp_path):
    with pytest.raises(transformer.ModelNotTrainedError, match="genflow stage train nope"):
        transformer.load_model("nope", tmp_path)
