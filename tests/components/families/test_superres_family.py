"""The super-resolution family with a tiny SuperResUNet: conditioning, training, evaluation, export, bad settings."""
import json

import numpy as np
import pytest
import torch

from components import data
from components.config import (
    ConditionConfig,
    DatasetConfig,
    DiffusionConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TrainConfig,
    UNetConfig,
    load_params,
)
from components.errors import GenflowError
from components.evaluation import superres as metrics_sr
from components.evaluation.images import image_metrics
from components.families import base
from components.families import superres as fam
from components.models.srunet import SuperResUNet
from components.models.unet import UNetConfigError
from components.sampling.superres import SuperResInputError, downsample

KEY = "tiny-sr"
TINY_UNET = UNetConfig(channels=[8, 16], time_dim=16, groups=4)


def tiny_model(**kw) -> ModelConfig:
    base_kw = dict(family="diffusion", backbone="unet-sr", dataset="digits", unet=TINY_UNET,
                   diffusion=DiffusionConfig(timesteps=10, p_uncond=0.0), condition=ConditionConfig(),
                   train=TrainConfig(max_steps=4, max_seconds=0, batch_size=8, warmup_steps=1, log_every=2,
                                     checkpoint_every=2, threads=1),
                   sample=SampleConfig(sampler="ddim", steps=4, guidance=0.0), eval=EvalConfig(num_samples=30))
    return ModelConfig(**{**base_kw, **kw})


def tiny_params(**kw) -> Params:
    return Params(datasets={"digits": DatasetConfig(source="builtin:digits")}, models={KEY: tiny_model(**kw)})


def random_net(upsample="bilinear", seed=0) -> SuperResUNet:
    torch.manual_seed(seed)
    net = SuperResUNet(TINY_UNET, image_size=8, in_channels=1, num_classes=10,
                       condition=ConditionConfig(upsample=upsample))
    for p in net.parameters():   # away from the zero initialisation, so every input matters
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


@pytest.fixture(scope="module")
def trained(digits_root):
    return fam.train(KEY, tiny_params(), digits_root)


# ---------------------------------------------------------------------------
# The network and its conditioning
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_the_low_res_image_conditions_the_output_at_twice_its_size(upsample):
    net = random_net(upsample)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9]), torch.full((3,), 10)
    low_a, low_b = torch.rand(3, 1, 4, 4) * 2 - 1, torch.rand(3, 1, 4, 4) * 2 - 1
    with torch.no_grad():
        a, a_again, b = net(x, t, y, low_a), net(x, t, y, low_a), net(x, t, y, low_b)
    assert a.shape == (3, 1, 8, 8)
    assert torch.equal(a, a_again)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3        # every image follows its own low-res input
    up = net.upsample(low_a)
    assert up.shape == (3, 1, 8, 8)
    if upsample == "nearest":
        assert torch.equal(up, low_a.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_upscale_images_follows_the_low_res_image(digits_root):
    config = {"backbone": "unet-sr", "unet": vars(TINY_UNET), "diffusion": {"timesteps": 10, "schedule": "cosine",
              "p_uncond": 0.0}, "condition": {"kind": "lowres", "factor": 2, "upsample": "bilinear"},
              "image_size": 8, "channels": 1, "levels": 17, "num_classes": 10}
    net = random_net()
    low = np.zeros((2, 4, 4), np.uint8)
    low[1] = 16                                                    # black and white low-res inputs
    out = fam.upscale_images(net, config, low, steps=4, seed=3)
    again = fam.upscale_images(net, config, low, steps=4, seed=3)
    assert out.shape == (2, 8, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out, again)
    np.testing.assert_allclose(out * 16, np.round(out * 16), atol=1e-5)   # on the data's grey levels
    swapped = fam.upscale_images(net, config, low[::-1].copy(), steps=4, seed=3)
    assert not np.array_equal(out, swapped)


def test_downsample_takes_block_means_on_the_grey_levels():
    x = np.array([[[0, 16, 4, 4], [16, 16, 4, 5], [1, 1, 0, 0], [1, 2, 0, 16]]], dtype=np.uint8)
    np.testing.assert_array_equal(downsample(x, 2, 17), [[[12, 4], [1, 4]]])   # 12, 4.25, 1.25, 4
    with pytest.raises(SuperResInputError, match=r"^downsample: height: image_size 3 is not divisible by 2"):
        downsample(np.zeros((1, 3, 4)), 2, 17)


def test_the_network_refuses_a_factor_that_does_not_divide_the_image():
    with pytest.raises(UNetConfigError, match=r"^condition.factor: 3 must be at least 2 and divide image_size 8"):
        SuperResUNet(TINY_UNET, image_size=8, condition=ConditionConfig(factor=3))


# ---------------------------------------------------------------------------
# Settings: one line each
# ---------------------------------------------------------------------------

def test_odd_image_size_and_bad_settings_are_refused_in_one_line(digits_root):
    manifest = dict(data.load_manifest("digits", digits_root), image_size=7)
    with pytest.raises(fam.SuperResFamilyError, match=r"^models.tiny-sr.condition.factor: image_size 7 is not "
                                                      r"divisible by 2, .*\(datasets.digits.image_size\)$") as e:
        fam.model_config(KEY, tiny_model(), manifest)
    assert "\n" not in str(e.value)
    with pytest.raises(fam.SuperResFamilyError, match=r"^models.tiny-sr.condition.factor: must be at least 2"):
        fam.check(KEY, tiny_model(condition=ConditionConfig(factor=1)))
    with pytest.raises(fam.SuperResFamilyError, match=r"^models.tiny-sr.sample.guidance: 2.0 asks for label "
                                                      r"guidance, .*; set it to 0$"):
        fam.check(KEY, tiny_model(sample=SampleConfig(guidance=2.0)))
    with pytest.raises(fam.SuperResFamilyError, match=r"^models.tiny-sr.backbone: 'unet' is not a super-resolution"):
        fam.check(KEY, tiny_model(backbone="unet"))


def test_params_yaml_checks_the_condition_section(project_root):
    params = load_params(project_root / "params.yaml")
    sr = params.model("digits-sr")
    assert (sr.backbone, sr.enabled, sr.condition.factor) == ("unet-sr", False, 2)
    assert params.promotion.rules["digits-sr"].metric == "eval/sr_psnr"
    with pytest.raises(GenflowError, match=r"^models.digits-sr.condition.upsample: expected one of 'nearest' \| "
                                           r"'bilinear', got 'cubic'$"):
        load_params(project_root / "params.yaml", ["models.digits-sr.condition.upsample=cubic"])
    with pytest.raises(GenflowError, match=r"^models.digits-sr.condition.kind: expected one of 'lowres'"):
        load_params(project_root / "params.yaml", ["models.digits-sr.condition.kind=mask"])


# ---------------------------------------------------------------------------
# Train, evaluate, export
# ---------------------------------------------------------------------------

def test_train_writes_the_condition_into_the_model_spec(digits_root, trained):
    assert trained["perf/train_steps"] == 4 and np.isfinite(trained["train/loss"])
    assert trained["perf/flops_per_item"] > 2 * trained["perf/params"]
    ckpt = torch.load(digits_root / "models" / KEY / "model.pt", weights_only=True)
    config = json.loads(json.dumps(ckpt["config"]))
    assert config["backbone"] == "unet-sr" and config["family"] == "diffusion"
    assert config["condition"] == {"kind": "lowres", "factor": 2, "upsample": "bilinear"}
    net, _ = fam.load_model(KEY, digits_root)
    assert isinstance(net, SuperResUNet) and not net.training
    assert base.backbone("unet-sr").family() is fam


def test_evaluate_scores_the_model_and_both_baselines(digits_root, trained):
    m = fam.evaluate(KEY, tiny_params(), digits_root)
    for name in ("eval/sr", "baseline/bicubic", "baseline/nearest"):
        for k in ("psnr", "class_acc", "fd"):
            assert np.isfinite(m[f"{name}_{k}"]), f"{name}_{k}"
    assert m["perf/sample_ms_per_item"] > 0
    assert m["eval/fd"] == m["eval/sr_fd"] and m["eval/class_acc"] == m["eval/sr_class_acc"]
    assert {"eval/nn_ratio", "baseline/kde_fd", "baseline/real_fd"} <= set(m)   # the digits models' shared names
    assert m["baseline/real_class_acc"] > 0.9                      # the originals, read by the reference net
    assert m["baseline/bicubic_psnr"] > 10                         # interpolation is close at 2x
    out = digits_root / "reports" / KEY
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(m)
    assert "| bicubic |" in (out / "superres.md").read_text()
    from PIL import Image
    assert Image.open(out / "samples.png").size == (10 * 34 + 2, 4 * 34 + 2)   # low-res, bicubic, model, original


def test_export_takes_the_low_res_image_as_an_input_and_passes_parity(digits_root, trained):
    from components.export import export_model

    net, config = fam.load_model(KEY, digits_root)
    result = export_model(KEY, net, config, ExportConfig(), digits_root)
    assert result["passed"] and result["max_abs"] < 1e-4, result.get("reason")
    exported = json.loads((digits_root / "exports" / KEY / "config.json").read_text())
    assert exported["graph"] == "sr_denoiser"
    assert [i["name"] for i in exported["inputs"]] == ["x", "t", "y", "lowres"]
    assert exported["inputs"][3]["shape"] == ["batch", 1, 4, 4]
    assert (exported["factor"], exported["lowres_size"], exported["upsample"]) == (2, 4, "bilinear")
    assert exported["spec"]["condition"]["factor"] == 2


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def test_psnr_and_interpolation():
    a = np.zeros((2, 4, 4))
    assert metrics_sr.psnr(a + 0.1, a) == pytest.approx(20.0)
    assert metrics_sr.psnr(a, a) == float("inf")
    low = np.array([[[0.0, 1.0], [0.5, 0.25]]])
    np.testing.assert_array_equal(metrics_sr.interpolate(low, 2, "nearest", 5),
                                  low.repeat(2, 1).repeat(2, 2))
    cubic = metrics_sr.interpolate(low, 2, "bicubic", 5)
    assert cubic.shape == (1, 4, 4) and cubic.min() >= 0 and cubic.max() <= 1
    np.testing.assert_allclose(cubic * 4, np.round(cubic * 4), atol=1e-6)   # rounded to the 5 grey levels


def test_superres_metrics_reward_the_originals(digits_root):
    x, y = data.load_images("digits", "test", digits_root)
    originals, labels = x[:40] / 16.0, y[:40]
    low = downsample(x[:40], 2, 17) / 16.0
    m = metrics_sr.superres_metrics(originals, low, originals, labels, "digits", digits_root, 2, 17)
    real = image_metrics(originals, labels, "digits", digits_root)
    assert m["eval/sr_psnr"] == float("inf")
    assert m["eval/sr_class_acc"] == real["eval/class_acc"] > m["baseline/nearest_class_acc"]
    assert m["eval/sr_fd"] == pytest.approx(real["eval/fd"]) and m["eval/sr_fd"] < m["baseline/nearest_fd"]
    assert 10 < m["baseline/nearest_psnr"] < 40 and 10 < m["baseline/bicubic_psnr"] < 40
    table = metrics_sr.superres_table({**m, "eval/sr_psnr": 99.0, "baseline/real_class_acc": 1.0,
                                       "baseline/real_fd": 0.5})
    assert "| diffusion (this model) | 99.00 |" in table and "| originals (ceiling) | | 1.000 | 0.5000 |" in table
