"""`genflow sample --upscale IMAGE` on a tiny exported super-resolution U-Net: the engine against
PyTorch, conditioning, files, bad input, no torch."""
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import ExportConfig, UNetConfig
from components.errors import GenflowError
from components.export import export_model
from components.inference import SuperResEngine, load_engine
from components.models.unet import UNet
from components.sampling import diffusion as sd
from flows.sample import sample_cli
from serving_models import UNET_CONFIG, export_tiny_sr, sample_without_torch, tiny_sr_net  # noqa: E402  (the tiny models, shared)

LOW = np.array([[0, 8, 16, 4], [2, 16, 16, 0], [0, 12, 16, 0], [0, 4, 16, 8]], dtype=np.uint8)   # 4x4, 17 levels


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A project root with a tiny exported super-resolution U-Net (digits-sr) and a plain U-Net (digits-unet)."""
    root = tmp_path_factory.mktemp("root")
    export_tiny_sr(root, "digits-sr")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), image_size=8, in_channels=1, num_classes=3)
    assert export_model("digits-unet", unet.eval(), UNET_CONFIG, ExportConfig(), root, exporter="torchscript")["passed"]
    return root


def engine_of(root) -> SuperResEngine:
    engine = load_engine(root / "exports" / "digits-sr", threads=1)
    assert isinstance(engine, SuperResEngine)
    return engine


def write_png(path, levels, n_levels=17, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = (levels.astype(np.float64) * 255 / (n_levels - 1)).round().astype(np.uint8)
    Image.fromarray(grey, "L").convert(mode).save(path)
    return path


def args(**kw) -> Namespace:
    base = dict(model="digits-sr", count=None, out=None, label=None, steps=None, guidance=None, prompt=None,
                length=None, temperature=None, top_k=None, seed=0, exports=None, inpaint=None, mask=None,
                jump=None, resample=None, resize=False, upscale=None)
    return Namespace(**{**base, **kw})


@pytest.mark.parametrize("sampler, steps, eta", [("ddim", 5, 0.0), ("ddim", 4, 1.0), ("ddpm", 20, 0.0)])
def test_the_engine_upscales_as_pytorch_does_from_the_same_noise(exported, sampler, steps, eta):
    engine = engine_of(exported)
    net = tiny_sr_net()                                   # the exported weights (same seed)
    low = engine.from_levels(np.stack([LOW, LOW[::-1]])[:, None])          # (2, 1, 4, 4) in [-1, 1]

    def numpy_noise(seed):
        rng = np.random.default_rng(seed)
        return lambda shape: rng.standard_normal(shape, dtype=np.float32)

    got = engine.upscale(low, sampler=sampler, steps=steps, eta=eta, randn=numpy_noise(3))
    draw = numpy_noise(3)
    randn = lambda shape: torch.from_numpy(draw(shape))  # noqa: E731
    low_t, y = torch.from_numpy(low), torch.zeros(2, dtype=torch.long)
    ts = sd.sampling_timesteps(engine.timesteps, steps)
    with torch.no_grad():
        want = sd.sample_loop(randn((2, 1, 8, 8)),
                              lambda x, t: sd.guided_noise(lambda x, t, y: net(x, t, y, low_t), x, t, y,
                                                           engine.null_class, 0.0),
                              randn, ts, engine.alphas_cumprod, sampler, eta).numpy()
    assert got.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_low_res_image_decides_the_upscaling(exported):
    engine = engine_of(exported)
    a = engine.upscale(engine.from_levels(LOW[None]), 2, steps=5, seed=1)
    b = engine.upscale(engine.from_levels(LOW[None][:, ::-1].copy()), 2, steps=5, seed=1)
    assert a.shape == b.shape == (2, 1, 8, 8)
    assert np.abs(a - b).max() > 1e-2
    np.testing.assert_array_equal(a, engine.upscale(engine.from_levels(LOW[None]), 2, steps=5, seed=1))
    assert not np.allclose(a[0], a[1])                                     # two draws, not one


def test_the_cli_writes_a_grid_and_one_file_per_upscaling(exported, tmp_path):
    image = write_png(tmp_path / "in" / "small.png", LOW)
    out = sample_cli(args(exports=str(exported / "exports"), upscale=str(image), count=3, steps=4), tmp_path)
    assert out == tmp_path / "reports" / "samples" / "digits-sr-local-upscale.png"
    assert Image.open(out).size == (3 * (32 + 2) + 2, 32 + 4)
    singles = sorted(out.parent.glob("digits-sr-local-upscale-*.png"))
    assert [p.name for p in singles] == [f"digits-sr-local-upscale-{i}.png" for i in (1, 2, 3)]
    assert all(Image.open(p).size == (8, 8) for p in singles)              # twice the input's 4x4


def test_resize_is_offered_for_another_size_and_applied_when_asked(exported, tmp_path):
    image = write_png(tmp_path / "in" / "big.png", np.kron(LOW, np.ones((2, 2), np.uint8)))   # 8x8
    with pytest.raises(GenflowError, match=r"^--upscale .*big.png: 8x8 pixels; digits-sr upscales 4x4 images to "
                                           r"8x8 \(1/2 of its size\); give a 4x4 image or add --resize$"):
        sample_cli(args(exports=str(exported / "exports"), upscale=str(image)), tmp_path)
    assert not (tmp_path / "reports").exists()
    out = sample_cli(args(exports=str(exported / "exports"), upscale=str(image), resize=True, count=1,
                          out=str(tmp_path / "r.png")), tmp_path)
    assert out.is_file() and Image.open(tmp_path / "r-1.png").size == (8, 8)


@pytest.mark.parametrize("kw, pattern", [
    (dict(mode="RGB"), r"^--upscale .*small.png: 3 channels \(RGB\), the model takes 1 \(grayscale\); convert the "
                       r"image$"),
    (dict(size=3), r"^--upscale .*small.png: 3x3 pixels; digits-sr upscales 4x4 images to 8x8"),
    (dict(label=1), r"^--label: digits-sr is a diffusion image model and has no such setting; drop it$"),
    (dict(guidance=2.0), r"^--guidance: digits-sr is a diffusion image model and has no such setting"),
    (dict(jump=2), r"^--jump: an inpainting setting"),
    (dict(mask="m.png"), r"^--upscale IMAGE: one editing mode at a time; drop --inpaint and --mask$"),
    (dict(model="digits-unet"), r"^--upscale: digits-unet is not a super-resolution model; use a model with "
                                r"backbone unet-sr \(e\.g\. digits-sr\)$"),
    (dict(steps=21), r"^--steps: 21 sampling steps asked for, but the model was trained with 20"),
    (dict(upscale="nothing.png"), r"^--upscale nothing.png: no such file$"),
    (dict(upscale=None), r"^--upscale: digits-sr is a super-resolution model: it draws images only from a 4x4 "
                         r"image; give --upscale IMAGE.png$"),
])
def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, monkeypatch, kw, pattern):
    size, mode = kw.pop("size", 4), kw.pop("mode", "L")
    levels = LOW if size == 4 else np.zeros((size, size), np.uint8)
    image = write_png(tmp_path / "in" / "small.png", levels, mode=mode)
    monkeypatch.chdir(tmp_path)
    kw = {"upscale": str(image), **kw}
    with pytest.raises(GenflowError, match=pattern) as e:
        sample_cli(args(exports=str(exported / "exports"), **kw), tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "reports").exists()


def test_the_cli_prints_one_line_and_exits_1(exported, tmp_path, capsys):
    from flows.cli import main

    image = write_png(tmp_path / "in" / "big.png", np.zeros((8, 8), np.uint8))
    code = main(["sample", "digits-sr", "--upscale", str(image), "--exports", str(exported / "exports")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("genflow sample: --upscale ") and "give a 4x4 image or add --resize" in err
    assert "\n" not in err


def test_upscaling_never_imports_torch(exported, tmp_path):
    image = write_png(tmp_path / "in" / "small.png", LOW)
    sample_without_torch(tmp_path, model="digits-sr", steps=4, exports=str(exported / "exports"), upscale=str(image))
    assert (tmp_path / "reports" / "samples" / "digits-sr-local-upscale-2.png").is_file()
