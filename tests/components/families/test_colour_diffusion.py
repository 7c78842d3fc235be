"""Colour (C = 3) through every image diffusion model: a tiny U-Net, DiT, unet-sr and unet-text each
train a few steps on (N, 16, 16, 3) images, export under the parity gate and sample torch-free on
onnxruntime at (N, 16, 16, 3) on the data's levels; torch and onnxruntime draw the same images;
inpainting keeps every channel of the kept pixels; grey stays one channel."""
import json
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from colour_data import LEVELS, SIZE, make_colour_dataset
from components import data
from components.config import (
    ConditionConfig,
    CrossAttentionConfig,
    DatasetConfig,
    DiffusionConfig,
    DiTConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TextEncoderConfig,
    TrainConfig,
    UNetConfig,
)
from components.errors import GenflowError
from components.export import export_model
from components.families import captions as fam_text
from components.families import diffusion as fam
from components.families import superres as fam_sr
from components.inference import SuperResEngine, TextDiffusionEngine, load_engine

TINY_UNET = UNetConfig(channels=[8, 16], time_dim=16, groups=4)
TRAIN = TrainConfig(max_steps=3, max_seconds=0, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=2,
                    threads=1)
DIFFUSION = DiffusionConfig(timesteps=10, schedule="cosine", p_uncond=0.2)


def model(backbone: str, dataset: str = "colours", **kw) -> ModelConfig:
    base = dict(family="diffusion", backbone=backbone, dataset=dataset, unet=TINY_UNET,
                dit=DiTConfig(patch_size=2, width=16, depth=1, heads=2), diffusion=DIFFUSION, train=TRAIN,
                sample=SampleConfig(sampler="ddim", steps=4, guidance=2.0), eval=EvalConfig(num_samples=20))
    return ModelConfig(**{**base, **kw})


def params() -> Params:
    image = DatasetConfig(source="imagefolder:colours", image_size=SIZE, levels=LEVELS)
    return Params(datasets={"colours": image, "colour-captions": DatasetConfig(source="imagefolder:cc",
                                                                               kind="captions")},
                  models={"c-unet": model("unet"), "c-dit": model("dit"),
                          "c-sr": model("unet-sr", diffusion=DiffusionConfig(timesteps=10, p_uncond=0.0),
                                        condition=ConditionConfig(), sample=SampleConfig(steps=4, guidance=0.0)),
                          "c-text": model("unet-text", dataset="colour-captions",
                                          textenc=TextEncoderConfig(n_layer=1, n_head=2, n_embd=16, context=32),
                                          cross_attention=CrossAttentionConfig(from_level=1, heads=2))})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_colour_dataset(tmp_path_factory.mktemp("colour-root"), "colours")
    return make_colour_dataset(root, "colour-captions", captions=True)


def rgb_png(levels: np.ndarray) -> str:
    """Levels 0..15 (H, W, 3) (or (H, W): grey) -> a base64 PNG, as a user's 8-bit image of them would be."""
    import base64
    import io

    buf = io.BytesIO()
    Image.fromarray(np.rint(levels * (255 / 15)).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decoded(png_b64: str) -> np.ndarray:
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def on_levels(unit: np.ndarray) -> bool:
    scaled = unit * (LEVELS - 1)
    return bool(np.all((unit >= 0) & (unit <= 1)) and np.allclose(scaled, np.round(scaled), atol=1e-5))


def randomise(net, seed=0):
    """Weights away from the zero-initialised outputs, so every input matters."""
    torch.manual_seed(seed)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.05)
    return net.eval()


# ---------------------------------------------------------------------------
# Arrays: (N, H, W[, C]) levels <-> (N, C, H, W) network inputs
# ---------------------------------------------------------------------------

def test_levels_to_model_and_back_keep_grey_one_channel_and_colour_three():
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) % 17
    colour = np.random.default_rng(0).integers(0, 16, (2, 4, 4, 3)).astype(np.uint8)
    g, c = fam.levels_to_model(grey, 17), fam.levels_to_model(colour, 16)
    assert g.shape == (2, 1, 4, 4) and c.shape == (2, 3, 4, 4) and c.flags.c_contiguous
    np.testing.assert_array_equal(c[:, 1], colour[..., 1].astype(np.float32) / 15 * 2 - 1)   # channel 1: green
    np.testing.assert_array_equal(g, (grey.astype(np.float32) / 16 * 2 - 1)[:, None])   # grey: as before
    assert fam.model_to_unit(g, 17).shape == (2, 4, 4)
    back = fam.model_to_unit(c, 16)
    assert back.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(np.rint(back * 15).astype(np.uint8), colour)
    np.testing.assert_array_equal(data.to_nchw(colour), np.moveaxis(colour, -1, 1))
    np.testing.assert_array_equal(data.from_nchw(data.to_nchw(colour)), colour)
    np.testing.assert_array_equal(data.from_nchw(data.to_nchw(grey)), grey)
    assert data.image_channels(grey) == 1 and data.image_channels(colour) == 3


def test_model_config_takes_channels_from_the_manifest_and_refuses_others(root):
    p = params()
    manifest = data.load_manifest("colours", root)
    assert fam.model_config("c-unet", p.models["c-unet"], manifest)["channels"] == 3
    assert fam_sr.model_config("c-sr", p.models["c-sr"], manifest)["channels"] == 3
    old = {k: v for k, v in manifest.items() if k != "channels"}             # an old manifest: grey
    assert fam.model_config("c-unet", p.models["c-unet"], old)["channels"] == 1
    with pytest.raises(GenflowError, match=r"models\.c-unet\.dataset: colours's manifest says channels=4"):
        fam.model_config("c-unet", p.models["c-unet"], {**manifest, "channels": 4})
    # the prepared images must have the spec's shape: a grey spec on colour data is refused in one line
    with pytest.raises(GenflowError, match=r"data/prepared/colours: images of shape \(16, 16, 3\)"):
        fam.training_data("c-unet", p.models["c-unet"], fam.model_config("c-unet", p.models["c-unet"], old), root)


# ---------------------------------------------------------------------------
# Class-conditional denoisers: U-Net and DiT
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["c-unet", "c-dit"])
def trained(request, root):
    key = request.param
    metrics = fam.train(key, params(), root)
    net, config = fam.load_model(key, root)
    return key, metrics, net, config


def test_a_colour_denoiser_trains_exports_and_samples_without_torch(root, trained):
    key, metrics, net, config = trained
    assert metrics["perf/train_steps"] == 3 and np.isfinite(metrics["train/loss"])
    assert config["channels"] == 3 and net.in_channels == 3
    batch, _ = fam.training_data(key, params().models[key], config, root)
    x0, _ = batch(0, torch.Generator().manual_seed(0))
    assert x0.shape == (8, 3, SIZE, SIZE) and x0.min() >= -1 and x0.max() <= 1
    assert metrics["perf/flops_per_item"] > 2 * metrics["perf/params"]
    step, items = fam.probe_step(net, config, 2, torch.Generator().manual_seed(0))
    assert items == 2 and np.isfinite(step().detach().item())     # the thread probe's step at 3 channels
    samples = fam.sample_images(net, config, np.array([0, 1, 2]), steps=3, guidance=1.0)
    assert samples.shape == (3, SIZE, SIZE, 3) and on_levels(samples)

    result = export_model(key, net, config, ExportConfig(), root, exporter="torchscript")
    assert result["passed"], result.get("reason")
    folder = root / "exports" / key
    exported = json.loads((folder / "config.json").read_text())
    assert exported["channels"] == 3 and exported["inputs"][0]["shape"][1] == 3   # x (B, 3, H, W)
    engine = load_engine(folder)
    x = engine.sample([0, 1, 2, 0], steps=3, seed=1)
    assert x.shape == (4, 3, SIZE, SIZE)
    unit = fam.model_to_unit(x, LEVELS)
    assert unit.shape == (4, SIZE, SIZE, 3) and on_levels(unit)


def test_torch_and_onnxruntime_draw_the_same_colour_images(root, tmp_path):
    config = fam.model_config("c-unet", params().models["c-unet"], data.load_manifest("colours", root))
    net = randomise(fam.build_network(config))
    assert export_model("c-unet", net, config, ExportConfig(), tmp_path, exporter="torchscript")["passed"]
    engine = load_engine(tmp_path / "exports" / "c-unet")
    labels = np.array([0, 1, 2, 1])
    gen = torch.Generator().manual_seed(0)     # the noise the PyTorch sampler draws for seed 0
    got = engine.sample(labels, steps=4, eta=0.0, guidance=2.0,
                        randn=lambda shape: torch.randn(shape, generator=gen).numpy())
    want = fam.sample_images(net, config, labels, steps=4, eta=0.0, guidance=2.0, seed=0)
    unit = fam.model_to_unit(got, LEVELS)
    assert unit.shape == want.shape == (4, SIZE, SIZE, 3)
    assert np.abs(unit - want).max() <= 1 / (LEVELS - 1) + 1e-6 and (unit == want).mean() > 0.98
    assert np.abs(want[..., 0] - want[..., 2]).max() > 0       # the channels are not copies of one another


def test_colour_inpainting_keeps_every_channel_of_the_kept_pixels(root, tmp_path):
    config = fam.model_config("c-unet", params().models["c-unet"], data.load_manifest("colours", root))
    net = randomise(fam.build_network(config))
    x, _ = data.load_images("colours", "test", root)
    levels = x[:3]
    keep = np.ones((3, SIZE, SIZE), dtype=bool)
    keep[:, SIZE // 2:] = False                                   # regenerate the bottom half
    out = fam.inpaint_images(net, config, levels, keep, steps=3, seed=0)
    assert out.shape == (3, SIZE, SIZE, 3) and on_levels(out)
    got = np.rint(out * (LEVELS - 1)).astype(np.uint8)
    np.testing.assert_array_equal(got[keep], levels[keep])        # (K, 3): every channel of each kept pixel
    assert (got[~keep] != levels[~keep]).any()

    # torch-free: a colour PNG and a per-pixel mask, as `genflow sample --inpaint` reads them
    from components.sampling.inpaint import read_inpaint_inputs

    assert export_model("c-unet", net, config, ExportConfig(), tmp_path, exporter="torchscript")["passed"]
    engine = load_engine(tmp_path / "exports" / "c-unet")
    Image.fromarray((levels[0].astype(np.float64) * 255 / 15).round().astype(np.uint8), "RGB").save(tmp_path / "i.png")
    Image.fromarray(np.where(keep[0], 0, 255).astype(np.uint8), "L").save(tmp_path / "m.png")
    pixels, kept = read_inpaint_inputs(tmp_path / "i.png", tmp_path / "m.png", engine.shape, LEVELS)
    assert pixels.shape == kept.shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(pixels, np.moveaxis(levels[0], -1, 0))
    filled = engine.to_levels(engine.inpaint(engine.from_levels(pixels), kept, 2, steps=3, seed=0))
    assert filled.shape == (2, 3, SIZE, SIZE)
    assert (filled[:, kept] == pixels[kept]).all()

    # served: {"inpaint": {"image": RGB PNG, "mask": PNG}} gives RGB completions keeping the kept pixels
    from components.serving.generate import Limits, plan, run_jobs

    mask = rgb_png(np.where(keep[0], 0, 15))                          # white: regenerate
    body = {"n": 2, "steps": 3, "seed": 0, "inpaint": {"image": rgb_png(levels[0]), "mask": mask}}
    (images,) = run_jobs(engine, [plan(engine, body, Limits())])
    served = np.stack([decoded(b) for b in images])                   # (2, H, W, 3) 0..255
    assert served.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(served[:, keep[0]], np.broadcast_to(np.rint(levels[0][keep[0]] * (255 / 15)),
                                                                      served[:, keep[0]].shape))


# ---------------------------------------------------------------------------
# Super-resolution: unet-sr
# ---------------------------------------------------------------------------

def test_a_colour_super_resolution_model_trains_exports_and_upscales_without_torch(root):
    from components.evaluation.superres import interpolate, psnr
    from components.sampling.superres import downsample, downsample_images

    metrics = fam_sr.train("c-sr", params(), root)
    assert metrics["perf/train_steps"] == 3
    net, config = fam_sr.load_model("c-sr", root)
    assert config["channels"] == 3 and net.conv_in.in_channels == 6      # noisy image + upsampled low-res
    x, _ = data.load_images("colours", "test", root)
    low = downsample_images(x[:4], 2, LEVELS)
    assert low.shape == (4, SIZE // 2, SIZE // 2, 3)
    np.testing.assert_array_equal(low[..., 2], downsample(x[:4, ..., 2], 2, LEVELS))   # per channel
    up = fam_sr.upscale_images(net, config, low, steps=3)
    assert up.shape == (4, SIZE, SIZE, 3) and on_levels(up)
    bicubic = interpolate(low / np.float32(LEVELS - 1), 2, "bicubic", LEVELS)
    assert bicubic.shape == (4, SIZE, SIZE, 3) and on_levels(bicubic)
    np.testing.assert_array_equal(bicubic[..., 1], interpolate(low[..., 1] / np.float32(LEVELS - 1), 2, "bicubic",
                                                               LEVELS))
    assert np.isfinite(psnr(bicubic, x[:4] / np.float32(LEVELS - 1)))

    assert export_model("c-sr", net, config, ExportConfig(), root, exporter="torchscript")["passed"]
    engine = load_engine(root / "exports" / "c-sr")
    assert isinstance(engine, SuperResEngine) and engine.lowres_shape == (3, SIZE // 2, SIZE // 2)
    got = engine.upscale(engine.from_levels(np.moveaxis(low[0], -1, 0)), 3, steps=3, seed=0)
    assert got.shape == (3, 3, SIZE, SIZE) and on_levels(fam.model_to_unit(got, LEVELS))

    # served: an RGB low-res PNG in, RGB PNGs out (what `genflow sample --upscale` draws for the seed)
    from components.serving.generate import Limits, RequestProblem, plan, run_jobs

    job = plan(engine, {"upscale": rgb_png(low[0]), "n": 3, "steps": 3, "seed": 0}, Limits())
    np.testing.assert_array_equal(job.settings["lowres"], np.moveaxis(low[0], -1, 0))
    (images,) = run_jobs(engine, [job])
    served = np.stack([decoded(b) for b in images])
    assert served.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(served, np.rint(np.moveaxis(engine.to_levels(got), 1, -1) * (255 / 15)))
    with pytest.raises(RequestProblem, match="channels"):
        plan(engine, {"upscale": rgb_png(low[0][..., 0]), "n": 1}, Limits())   # a grey PNG: 1 channel, not 3

    # `genflow sample c-sr --upscale small.png` in a fresh interpreter without torch: RGB grid and files
    from serving_models import sample_without_torch

    Image.fromarray(np.rint(low[0] * (255 / 15)).astype(np.uint8)).save(root / "small.png")
    sample_without_torch(root, model="c-sr", exports=str(root / "exports"), upscale=str(root / "small.png"),
                         count=2, steps=2)
    for name in ("c-sr-local-upscale.png", "c-sr-local-upscale-1.png", "c-sr-local-upscale-2.png"):
        with Image.open(root / "reports" / "samples" / name) as im:
            assert im.mode == "RGB"
    with Image.open(root / "reports" / "samples" / "c-sr-local-upscale-1.png") as im:
        assert im.size == (SIZE, SIZE)


# ---------------------------------------------------------------------------
# Text-to-image: unet-text
# ---------------------------------------------------------------------------

def test_a_colour_text_to_image_model_trains_exports_and_draws_without_torch(root):
    metrics = fam_text.train("c-text", params(), root)
    assert metrics["perf/train_steps"] == 3
    net, config = fam_text.load_model("c-text", root)
    assert config["channels"] == 3
    x = fam_text.sample_prompts(net, config, ["a red square", "a blue bar"], steps=3)
    assert x.shape == (2, SIZE, SIZE, 3) and on_levels(x)
    result = export_model("c-text", net, config, ExportConfig(), root)
    assert result["passed"], result.get("reason")
    engine = load_engine(root / "exports" / "c-text")
    assert isinstance(engine, TextDiffusionEngine)
    got = engine.sample_prompts(["a green disc"] * 2, steps=3, seed=0)
    assert got.shape == (2, 3, SIZE, SIZE) and on_levels(fam.model_to_unit(got, LEVELS))


# ---------------------------------------------------------------------------
# What people see: `genflow sample` PNGs and the served images
# ---------------------------------------------------------------------------

def test_genflow_sample_writes_an_rgb_grid_for_a_colour_model_and_grey_for_grey(root, tmp_path):
    from flows.sample import image_grid, sample_cli, write_png

    config = fam.model_config("c-unet", params().models["c-unet"], data.load_manifest("colours", root))
    net = randomise(fam.build_network(config))
    assert export_model("c-unet", net, config, ExportConfig(), tmp_path, exporter="torchscript")["passed"]
    args = Namespace(model="c-unet", count=2, out=None, label=None, steps=2, guidance=None, prompt=None,
                     length=None, temperature=None, top_k=None, seed=0, exports=str(tmp_path / "exports"),
                     inpaint=None, mask=None, jump=None, resample=None, resize=False, upscale=None)
    out = sample_cli(args, tmp_path)
    with Image.open(out) as im:
        assert im.mode == "RGB"
        pixels = np.asarray(im)
    assert pixels.shape[0] == 3 * (SIZE * 4 + 2) + 2                # one row per class
    cell = pixels[2:2 + 4 * SIZE, 2:2 + 4 * SIZE]
    assert (cell[..., 0] != cell[..., 1]).any()                      # a colour picture, not grey in RGB

    levels = np.zeros((1, 3, 2, 2), np.uint8)
    levels[0, 0, 0, 0] = LEVELS - 1                                   # one pure red pixel
    write_png(tmp_path / "one.png", image_grid(levels, LEVELS, 1, 1, 0))
    with Image.open(tmp_path / "one.png") as im:
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((1, 0)) == (0, 0, 0)
    write_png(tmp_path / "grey.png", image_grid(np.full((1, 1, 2, 2), 8, np.uint8), 17, 1, 1, 0))
    with Image.open(tmp_path / "grey.png") as im:
        assert im.mode == "L" and im.getpixel((0, 0)) == 128


def test_served_images_are_rgb_pngs_for_colour_and_grey_for_grey():
    import base64
    import io

    from components.serving.generate import png_base64

    levels = np.zeros((3, 2, 2), np.uint8)
    levels[2, 1, 1] = 15                                              # one pure blue pixel
    with Image.open(io.BytesIO(base64.b64decode(png_base64(levels, 16)))) as im:
        assert im.mode == "RGB" and im.size == (2, 2)
        assert im.getpixel((1, 1)) == (0, 0, 255) and im.getpixel((0, 0)) == (0, 0, 0)
    with Image.open(io.BytesIO(base64.b64decode(png_base64(np.full((1, 2, 2), 16, np.uint8), 17)))) as im:
        assert im.mode == "L" and im.getpixel((0, 0)) == 255


# ---------------------------------------------------------------------------
# Unlabelled data: one class, trained unconditionally, class accuracy not applicable
# ---------------------------------------------------------------------------

def test_an_unlabelled_dataset_is_evaluated_without_class_accuracy(tmp_path):
    from components.evaluation.images import UNLABELLED

    root = make_colour_dataset(tmp_path, "blobs", labelled=False, channels=1)
    p = Params(datasets={"blobs": DatasetConfig(source="imagefolder:blobs", image_size=SIZE, levels=LEVELS)},
               models={"u-unet": model("unet", dataset="blobs",
                                       eval=EvalConfig(num_samples=12, sampler_sweep=["ddim2"], inpaint_samples=4))})
    fam.train("u-unet", p, root)
    metrics = fam.evaluate("u-unet", p, root)
    assert np.isfinite(metrics["eval/fd"]) and np.isfinite(metrics["eval/inpaint_mse"])
    assert not [k for k in metrics if "class_acc" in k and k.startswith("eval/")]
    table = (root / "reports" / "u-unet" / "sampling.md").read_text()
    assert f"class_acc: {UNLABELLED}" in table


def test_genflow_sample_inpaint_completes_a_colour_pixel_gpts_bottom_rows(tmp_path):
    from components.config import GPTConfig
    from components.models.gpt import GPT
    from flows.sample import sample_cli

    size, levels, classes = 4, 4, 2
    config = {"backbone": "gpt", "family": "transformer", "kind": "image", "levels": levels,
              "num_classes": classes, "image_size": size, "channels": 3}
    net = randomise(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=size * size * 3), levels + classes))
    assert export_model("rgb-gpt", net, config, ExportConfig(), tmp_path, exporter="torchscript")["passed"]
    image = np.random.default_rng(0).integers(0, levels, (size, size, 3)).astype(np.uint8)
    Image.fromarray((image * 85).astype(np.uint8), "RGB").save(tmp_path / "i.png")       # 85 = 255 / (levels - 1)
    mask = np.zeros((size, size), np.uint8)
    mask[2:] = 255                                                                      # regenerate the bottom half
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    args = Namespace(model="rgb-gpt", count=3, out=None, label=1, steps=None, guidance=None, prompt=None,
                     length=None, temperature=None, top_k=None, seed=0, exports=str(tmp_path / "exports"),
                     inpaint=str(tmp_path / "i.png"), mask=str(tmp_path / "m.png"), jump=None, resample=None,
                     resize=False, upscale=None)
    out = sample_cli(args, tmp_path)
    for i in (1, 2, 3):
        with Image.open(out.with_name(f"{out.stem}-{i}.png")) as im:
            assert im.mode == "RGB" and im.size == (size, size)
            np.testing.assert_array_equal(np.asarray(im)[:2], image[:2] * 85)          # every channel of the top


def test_unlabelled_colour_captions_are_evaluated_on_the_images_alone(tmp_path):
    from components.evaluation.images import UNLABELLED

    root = make_colour_dataset(tmp_path, "colour-captions", captions=True)
    path = root / "data" / "prepared" / "colour-captions" / "manifest.json"
    manifest = json.loads(path.read_text())           # the contract's unlabelled form: one class, labelled false
    path.write_text(json.dumps({**manifest, "classes": ["colour-captions"], "labelled": False}))
    p = params()
    p.models["c-text"] = model("unet-text", dataset="colour-captions",
                               textenc=TextEncoderConfig(n_layer=1, n_head=2, n_embd=16, context=32),
                               cross_attention=CrossAttentionConfig(from_level=1, heads=2),
                               eval=EvalConfig(num_samples=12, guidance_sweep=[1.0]))
    fam_text.train("c-text", p, root)
    metrics = fam_text.evaluate("c-text", p, root)
    assert np.isfinite(metrics["eval/fd"]) and np.isfinite(metrics["eval/fd_g1"]) and "baseline/real_fd" in metrics
    assert not [k for k in metrics if "class_acc" in k or "prompt_acc" in k or "attribute_error" in k]
    report = root / "reports" / "c-text"
    table = (report / "guidance.md").read_text()
    assert f"prompt_acc: {UNLABELLED}" in table and f"attribute_error: {UNLABELLED}" in table
    with Image.open(report / "samples.png") as im:
        assert im.mode == "RGB"
