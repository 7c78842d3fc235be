"""`genflow sample --inpaint IMAGE --mask MASK` on a tiny exported U-Net: completions, files, bad input."""
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import ExportConfig, GPTConfig, UNetConfig
from components.data import quantise_grey, square_resize
from components.errors import GenflowError
from components.export import export_model
from components.inference import load_engine
from components.models.gpt import GPT
from components.models.unet import UNet
from components.sampling import diffusion as sd
from flows.sample import sample_cli
from serving_models import PIXELS_CONFIG, UNET_CONFIG, sample_without_torch  # noqa: E402  (the tiny models' configs, shared)

LEVELS = UNET_CONFIG["levels"]  # 17


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A project root with a tiny exported U-Net (3 classes) and a pixel GPT (TorchScript: quick)."""
    root = tmp_path_factory.mktemp("root")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), image_size=8, in_channels=1, num_classes=3)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.2)
    pixels = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=17), 8)
    assert export_model("digits-unet", unet.eval(), UNET_CONFIG, ExportConfig(), root, exporter="torchscript")["passed"]
    assert export_model("digits-gpt", pixels.eval(), PIXELS_CONFIG, ExportConfig(), root,
                        exporter="torchscript")["passed"]
    return root


def digit_levels() -> np.ndarray:
    """An 8x8 picture in grey levels 0..16: a ring."""
    x = np.zeros((8, 8), dtype=np.uint8)
    x[1:7, 2] = x[1:7, 5] = 16
    x[1, 2:6] = x[6, 2:6] = 12
    return x


def write_inputs(folder, size=8, mask_size=None, hole=(slice(2, 6), slice(1, 5)), mode="L"):
    """image.png from digit_levels() (levels scaled to 0..255) and mask.png, white on `hole`."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = (digit_levels().astype(np.float64) * 255 / 16).round().astype(np.uint8)
    im = Image.fromarray(grey, "L").resize((size, size), Image.Resampling.NEAREST).convert(mode)
    im.save(folder / "image.png")
    m = np.zeros((8, 8), dtype=np.uint8)
    m[hole] = 255
    mask = Image.fromarray(m, "L").resize((mask_size or size,) * 2, Image.Resampling.NEAREST)
    mask.save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png", m == 0


def args(**kw) -> Namespace:
    base = dict(model="digits-unet", count=None, out=None, label=None, steps=None, guidance=None, prompt=None,
                length=None, temperature=None, top_k=None, seed=0, exports=None, inpaint=None, mask=None,
                jump=None, resample=None, resize=False)
    return Namespace(**{**base, **kw})


def read_levels(path) -> np.ndarray:
    return np.rint(np.asarray(Image.open(path), dtype=np.float64) * 16 / 255).astype(np.uint8)


@pytest.mark.parametrize("sampler, steps, jump, resample, label", [
    ("ddim", 10, 1, 1, 2), ("ddim", 10, 3, 3, None), ("ddpm", 20, 1, 1, None), ("ddpm", 20, 5, 2, 1)])
def test_the_engine_keeps_the_known_pixels_for_ddim_and_ddpm(exported, sampler, steps, jump, resample, label):
    engine = load_engine(exported / "exports" / "digits-unet", threads=1)
    image = engine.from_levels(digit_levels()[None])                       # (1, 8, 8) in [-1, 1]
    keep = np.ones((1, 8, 8), dtype=bool)
    keep[:, 2:6, 1:5] = False
    x = engine.inpaint(image, keep, 3, label, sampler=sampler, steps=steps, jump_length=jump,
                       jump_n_sample=resample, seed=4)
    assert x.shape == (3, 1, 8, 8)
    assert np.array_equal(x[:, keep], np.broadcast_to(image[keep], (3, int(keep.sum()))))
    assert np.array_equal(engine.to_levels(x)[:, keep], np.broadcast_to(digit_levels()[None][keep], (3, 48)))
    assert not np.allclose(x[0, ~keep], x[1, ~keep])                       # several completions, not one


def test_unconditional_uses_the_null_class_and_conditional_the_guided_label(exported):
    engine = load_engine(exported / "exports" / "digits-unet", threads=1)
    image = engine.from_levels(digit_levels()[None])
    keep = np.ones((1, 8, 8), dtype=bool)
    keep[:, :, 4:] = False
    ts = sd.sampling_timesteps(engine.timesteps, 10)

    def by_hand(y, guidance):
        rng = np.random.default_rng(7)
        randn = lambda shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
        known = np.broadcast_to(image, (2, 1, 8, 8))
        eps = lambda x, t: sd.guided_noise(engine.denoise, x, t, y, engine.null_class, guidance)  # noqa: E731
        return sd.inpaint_loop(randn(known.shape), known, np.broadcast_to(keep, known.shape), eps, randn, ts,
                               engine.alphas_cumprod, "ddim")

    uncond = engine.inpaint(image, keep, 2, None, steps=10, seed=7)
    cond = engine.inpaint(image, keep, 2, 1, steps=10, seed=7)              # the model's guidance: 2.0
    np.testing.assert_allclose(uncond, by_hand(np.zeros(2, dtype=np.int64), 0.0), atol=1e-6)
    np.testing.assert_allclose(cond, by_hand(np.ones(2, dtype=np.int64), 2.0), atol=1e-6)
    assert not np.allclose(uncond, cond)


def test_the_cli_writes_a_grid_and_one_file_per_completion(exported, tmp_path):
    image, mask, keep = write_inputs(tmp_path / "in")
    out = sample_cli(args(exports=str(exported / "exports"), inpaint=str(image), mask=str(mask), count=3, label=1,
                          jump=2, resample=2, steps=8), tmp_path)
    assert out == tmp_path / "reports" / "samples" / "digits-unet-local-inpaint.png"
    assert Image.open(out).size == (3 * (32 + 2) + 2, 32 + 4)
    singles = sorted(out.parent.glob("digits-unet-local-inpaint-*.png"))
    assert [p.name for p in singles] == [f"digits-unet-local-inpaint-{i}.png" for i in (1, 2, 3)]
    for p in singles:
        levels = read_levels(p)
        assert levels.shape == (8, 8)
        assert np.array_equal(levels[keep], digit_levels()[keep])


def test_resize_is_offered_for_another_size_and_applied_when_asked(exported, tmp_path):
    image, mask, keep = write_inputs(tmp_path / "in", size=32)
    with pytest.raises(GenflowError, match=r"^--inpaint .*image.png: 32x32 pixels, the model takes 8x8; "
                                           r"give a 8x8 image or add --resize$"):
        sample_cli(args(exports=str(exported / "exports"), inpaint=str(image), mask=str(mask)), tmp_path)
    assert not (tmp_path / "reports").exists()
    out = sample_cli(args(exports=str(exported / "exports"), inpaint=str(image), mask=str(mask), resize=True,
                          count=2, out=str(tmp_path / "r.png")), tmp_path)
    as_data = quantise_grey(square_resize(Image.open(image), 8), LEVELS)   # as the data pipeline resizes
    assert np.array_equal(read_levels(tmp_path / "r-1.png")[keep], as_data[keep])
    assert out.is_file()


@pytest.mark.parametrize("setup, kw, pattern", [
    (dict(mask_size=6), {}, r"^--mask .*mask.png: 6x6 pixels, the image is 8x8; give a mask of the image's size$"),
    (dict(hole=(slice(0, 0), slice(0, 0))), {}, r"^--mask: nothing to fill \(all black: every pixel is kept\)"),
    (dict(mode="RGB"), {}, r"^--inpaint .*image.png: 3 channels \(RGB\), the model takes 1 \(grayscale\); "
                           r"convert the image$"),
    (dict(mode="LA"), {}, r"^--inpaint .*: 2 channels \(LA\)"),
    (dict(size=10, mask_size=10), {}, r"^--inpaint .*: 10x10 pixels, the model takes 8x8; .* add --resize$"),
    ({}, dict(label=5), r"^--label: digits-unet knows classes 0\.\.2, got 5$"),
    ({}, dict(jump=10, resample=2, steps=10), r"^--jump: 10 must be below the 10 sampling steps"),
    ({}, dict(resample=0), r"^--resample: must be at least 1"),
    ({}, dict(jump=3), r"^--jump: sets how far each resampling goes back; give --resample R"),
    ({}, dict(guidance=2.0), r"^--guidance: steers towards a --label"),
    ({}, dict(mask=None), r"^--inpaint IMAGE and --mask MASK go together"),
    ({}, dict(inpaint=None, mask=None, jump=3), r"^--jump: an inpainting setting"),
])
def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, setup, kw, pattern):
    image, mask, _ = write_inputs(tmp_path / "in", **setup)
    kw = {"inpaint": str(image), "mask": str(mask), **kw}
    with pytest.raises(GenflowError, match=pattern) as e:
        sample_cli(args(exports=str(exported / "exports"), **kw), tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "reports").exists()


def test_the_cli_prints_one_line_and_exits_1(exported, tmp_path, capsys):
    from flows.cli import main

    image, mask, _ = write_inputs(tmp_path / "in", hole=(slice(0, 0), slice(0, 0)))
    code = main(["sample", "digits-unet", "--inpaint", str(image), "--mask", str(mask),
                 "--exports", str(exported / "exports")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("genflow sample: --mask: nothing to fill") and "\n" not in err


def test_inpainting_never_imports_torch(exported, tmp_path):
    image, mask, _ = write_inputs(tmp_path / "in")
    sample_without_torch(tmp_path, ("components.sampling.inpaint",), model="digits-unet", steps=4,
                         exports=str(exported / "exports"), inpaint=str(image), mask=str(mask), jump=2, resample=2)
    assert (tmp_path / "reports" / "samples" / "digits-unet-local-inpaint-2.png").is_file()


def write_small(folder, keep_rows=2, hole=None):
    """A 4x4 image in the pixel GPT's 5 levels and a mask: white below the first `keep_rows` rows (or on `hole`)."""
    folder.mkdir(parents=True, exist_ok=True)
    levels = np.array([[0, 4, 4, 0], [1, 2, 3, 4], [4, 3, 2, 1], [0, 1, 0, 1]], dtype=np.uint8)
    Image.fromarray((levels.astype(np.int64) * 255 // 4).astype(np.uint8), "L").save(folder / "small.png")
    m = np.zeros((4, 4), dtype=np.uint8)
    m[hole if hole is not None else slice(keep_rows, None)] = 255
    Image.fromarray(m, "L").save(folder / "small-mask.png")
    return folder / "small.png", folder / "small-mask.png", levels


def test_a_pixel_gpt_completes_the_bottom_of_an_image(exported, tmp_path):
    image, mask, levels = write_small(tmp_path / "in", keep_rows=2)
    out = sample_cli(args(model="digits-gpt", exports=str(exported / "exports"), inpaint=str(image), mask=str(mask),
                          label=1, count=3), tmp_path)
    singles = sorted(out.parent.glob("digits-gpt-local-inpaint-*.png"))
    assert len(singles) == 3
    got = [np.rint(np.asarray(Image.open(p), dtype=np.float64) * 4 / 255).astype(np.uint8) for p in singles]
    assert all(np.array_equal(g[:2], levels[:2]) for g in got)            # the top two rows as given
    assert all(g.max() <= 4 for g in got)
    image, mask, _ = write_small(tmp_path / "in2", keep_rows=0)
    sample_cli(args(model="digits-gpt", exports=str(exported / "exports"), inpaint=str(image), mask=str(mask),
                    label=0, count=1), tmp_path)                             # all white: a fresh sample


@pytest.mark.parametrize("hole, kw, pattern", [
    ((slice(1, 3), slice(1, 3)), dict(label=1),
     r"^--inpaint: digits-gpt is an autoregressive model: it writes the pixels in raster order and cannot "
     r"condition on later pixels, so it completes only a mask that regenerates every pixel after the first ones"),
    (None, {}, r"^--label: digits-gpt writes a digit of a given class; give --label$"),
    (None, dict(label=1, steps=5), r"^--steps: digits-gpt is an autoregressive model and has no such setting"),
    (None, dict(label=7), r"^--label: digits-gpt knows classes 0\.\.2, got 7$"),
])
def test_a_pixel_gpt_refuses_a_mask_it_cannot_honour(exported, tmp_path, hole, kw, pattern):
    image, mask, _ = write_small(tmp_path / "in", hole=hole)
    with pytest.raises(GenflowError, match=pattern) as e:
        sample_cli(args(model="digits-gpt", exports=str(exported / "exports"), inpaint=str(image), mask=str(mask),
                        **kw), tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "reports").exists()
