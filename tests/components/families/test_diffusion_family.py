"""Diffusion family end to end with a tiny U-Net: train, load, evaluate, files, errors."""
import json

import numpy as np
import pytest
import torch

from components import data
from components.config import (
    DatasetConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TrainConfig,
    UNetConfig,
)
from components.families import diffusion as fam
from components.models.diffusion import DiffusionInputError

KEY = "tiny-unet"



def tiny_params(**sample) -> Params:
    model = ModelConfig(
        family="diffusion", backbone="unet", dataset="digits",
        unet=UNetConfig(channels=[8, 16], time_dim=16, groups=4),
        diffusion=DiffusionConfig(timesteps=10, schedule="cosine", p_uncond=0.2),
        train=TrainConfig(max_steps=3, max_seconds=0, batch_size=8, warmup_steps=1, log_every=1,
                          checkpoint_every=2, threads=1),
        sample=SampleConfig(**{"sampler": "ddim", "steps": 5, "guidance": 2.0, **sample}),
        eval=EvalConfig(num_samples=20, sampler_sweep=["ddpm", "ddim5", "ddim2"], inpaint_samples=10,
                        inpaint_jump=2, inpaint_resample=2))
    return Params(datasets={"digits": DatasetConfig(source="builtin:digits")}, models={KEY: model})


@pytest.fixture(scope="module")
def trained(digits_root):
    return fam.train(KEY, tiny_params(), digits_root)


def test_train_writes_weights_config_and_metrics(digits_root, trained):
    assert set(trained) >= {"train/loss", "perf/train_seconds", "perf/train_items_per_s", "perf/train_steps",
                            "perf/params", "perf/flops_per_item"}
    assert all(k.startswith(("train/", "perf/")) for k in trained)
    assert trained["perf/train_steps"] == 3 and np.isfinite(trained["train/loss"])
    assert trained["perf/flops_per_item"] > 2 * trained["perf/params"]   # forward + backward per image
    folder = digits_root / "models" / KEY
    assert json.loads((folder / "train_metrics.json").read_text()) == pytest.approx(trained)
    ckpt = torch.load(folder / "model.pt", weights_only=True)
    config = json.loads(json.dumps(ckpt["config"]))                      # plain JSON
    assert config["num_classes"] == 10 and config["image_size"] == 8 and config["levels"] == 17
    assert config["backbone"] == "unet" and config["unet"]["channels"] == [8, 16]
    assert config["diffusion"]["timesteps"] == 10
    assert (folder / "ckpt").is_dir()


def test_training_is_reproducible(digits_root, trained):
    first = torch.load(digits_root / "models" / KEY / "model.pt", weights_only=True)["state_dict"]
    fam.train(KEY, tiny_params(), digits_root)                           # finished checkpoint: a fresh run
    second = torch.load(digits_root / "models" / KEY / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_load_model_and_sample(digits_root, trained):
    net, config = fam.load_model(KEY, digits_root)
    assert not net.training
    labels = np.array([0, 3, 9, 3])
    a = fam.sample_images(net, config, labels, steps=4, guidance=2.0, seed=1)
    b = fam.sample_images(net, config, labels, steps=4, guidance=2.0, seed=1)
    assert a.shape == (4, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_allclose(a * 16, np.round(a * 16), atol=1e-5)      # on the data's 17 grey levels


def test_evaluate_writes_reports(digits_root, trained):
    metrics = fam.evaluate(KEY, tiny_params(), digits_root)
    for m in ("fd", "kid", "precision", "recall", "class_acc", "nn_ratio"):
        assert f"eval/{m}" in metrics and f"baseline/real_{m}" in metrics and f"baseline/kde_{m}" in metrics
        for sampler in ("ddpm", "ddim5", "ddim2"):
            assert f"eval/{m}_{sampler}" in metrics
    assert metrics["eval/fd"] == metrics["eval/fd_ddim5"]                # the headline sampler is ddim-5
    assert metrics["perf/sample_ms_per_item"] > 0 and "perf/sample_ms_per_item_ddpm" in metrics
    for k in ("class_acc", "mse", "consistency"):   # inpainting: every mask, their mean, the baselines
        for mask in ("bottom", "left", "centre", "random"):
            assert np.isfinite(metrics[f"eval/inpaint_{mask}_{k}"]) and f"baseline/nn_inpaint_{mask}_{k}" in metrics
        assert f"eval/inpaint_{k}" in metrics and f"baseline/mean_inpaint_{k}" in metrics
    assert metrics["perf/inpaint_ms_per_item"] > 0
    out = digits_root / "reports" / KEY
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    sweep = json.loads((out / "sampling.json").read_text())
    assert [(r["name"], r["sampler"], r["steps"]) for r in sweep["samplers"]] == \
        [("ddpm", "ddpm", 10), ("ddim5", "ddim", 5), ("ddim2", "ddim", 2)]
    table = (out / "sampling.md").read_text()
    assert "| ddpm | 10 |" in table and "| real (baseline) |" in table
    from PIL import Image
    assert Image.open(out / "samples.png").size == (10 * 34 + 2, 10 * 34 + 2)  # a row per class, blanks padded


def test_inpaint_images_keeps_the_known_pixels_and_fills_the_rest(digits_root, trained):
    from components.evaluation.editing import inpaint_masks

    net, config = fam.load_model(KEY, digits_root)
    x, _ = data.load_images("digits", "test", digits_root)
    keep = inpaint_masks(4, 8, 8, seed=0)["random"]
    kw = dict(steps=4, jump_length=2, jump_n_sample=2, seed=3)
    a = fam.inpaint_images(net, config, x[:4], keep, **kw)
    assert a.shape == (4, 8, 8) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_allclose(a[keep] * 16, x[:4][keep], atol=1e-4)   # RePaint: kept pixels come back as given
    np.testing.assert_array_equal(a, fam.inpaint_images(net, config, x[:4], keep, **kw))   # seeded
    b = fam.inpaint_images(net, config, x[:4], keep, infer_label=True, guidance=2.0, **kw)  # the class it infers
    np.testing.assert_allclose(b[keep] * 16, x[:4][keep], atol=1e-4)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(b, fam.inpaint_images(net, config, x[:4], keep, infer_label=True, guidance=2.0,
                                                        **kw))   # the label completions are seeded too
    c = fam.inpaint_images(net, config, x[:4], keep, infer_label=True, guidance=2.0, label_completions=1, **kw)
    np.testing.assert_allclose(c[keep] * 16, x[:4][keep], atol=1e-4)
    assert not np.array_equal(b, c)   # fewer completions: other draws of the generator before the last fill


def test_class_rows_puts_one_class_per_row():
    labels = np.arange(30) % 3
    samples = labels[:, None, None].astype(np.float32) * np.ones((30, 2, 2), np.float32)
    rows = fam.class_rows(samples, labels, num_classes=3, per_row=10)
    assert rows.shape == (30, 2, 2)
    assert rows[:10].max() == 0 and rows[10:20].min() == 1 and rows[20:].min() == 2


def test_bad_requests_fail_before_sampling(digits_root, trained, monkeypatch):
    monkeypatch.setattr(fam, "sample_images", lambda *a, **k: pytest.fail("sampled despite a bad request"))
    bad_sweep = tiny_params()
    bad_sweep.models[KEY].eval.sampler_sweep = ["ddim50"]
    with pytest.raises(fam.DiffusionFamilyError, match="timesteps=10"):
        fam.evaluate(KEY, bad_sweep, digits_root)
    bad_sweep.models[KEY].eval.sampler_sweep = ["euler"]
    with pytest.raises(fam.DiffusionFamilyError, match="not a sampler"):
        fam.evaluate(KEY, bad_sweep, digits_root)
    with pytest.raises(DiffusionInputError, match="guidance"):
        fam.evaluate(KEY, tiny_params(guidance=-1.0), digits_root)
    with pytest.raises(DiffusionInputError, match="steps"):
        fam.evaluate(KEY, tiny_params(steps=11), digits_root)


def test_missing_model_and_wrong_backbone(digits_root):
    with pytest.raises(fam.DiffusionFamilyError, match="genflow stage train nothing-here"):
        fam.load_model("nothing-here", digits_root)
    mc = ModelConfig(family="transformer", backbone="gpt", dataset="digits")
    with pytest.raises(fam.DiffusionFamilyError, match="backbone"):
        fam.model_config("digits-gpt", mc, data.load_manifest("digits", digits_root))
