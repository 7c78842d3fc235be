"""Colour (C = 3) through the autoregressive image models: the pixel GPT and captions-encdec on a
synthetic 8x8 RGB dataset (tests/colour_data.py): tokens, training, sampling, inpainting,
bits per dimension, export and torch-free sampling on onnxruntime."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colour_data import colour_arrays, make_colour_dataset
from components import data
from components.config import (
    DatasetConfig,
    EncDecConfig,
    EvalConfig,
    ExportConfig,
    GPTConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TrainConfig,
)
from components.errors import DataError, ModelError
from components.export import export_model
from components.families import captions_encdec, transformer
from components.inference import load_engine
from components.tokenizer import image_tokens, tokens_to_images, tokens_to_nchw

GPT_KEY, ENC_KEY, UNL_KEY = "rgb-gpt", "rgb-encdec", "rgb1-gpt"
LEVELS, SIZE, D = 16, 8, 8 * 8 * 3


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 3, "max_seconds": 0, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
                          "checkpoint_every": 0, "threads": 1, **kw})


def tiny_params(block_size: int = D, target_len: int = D) -> Params:
    gpt = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block_size)
    models = {
        GPT_KEY: ModelConfig(family="transformer", backbone="gpt", dataset="shapes-rgb", gpt=gpt, train=_train(),
                             eval=EvalConfig(num_samples=6, inpaint_samples=0)),
        UNL_KEY: ModelConfig(family="transformer", backbone="gpt", dataset="shapes-rgb1", gpt=gpt, train=_train()),
        ENC_KEY: ModelConfig(family="transformer", backbone="encdec-pixels", dataset="shapes-cap",
                             encdec=EncDecConfig(n_layer_enc=1, n_layer_dec=1, n_head=2, n_embd=16, source_len=24,
                                                 target_len=target_len),
                             train=_train(), sample=SampleConfig(temperature=1.0)),
    }
    datasets = {name: DatasetConfig(source=f"imagefolder:tmp/{name}", kind=kind, image_size=SIZE, levels=LEVELS)
                for name, kind in (("shapes-rgb", "image"), ("shapes-rgb1", "image"), ("shapes-cap", "captions"))}
    return Params(datasets=datasets, models=models)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour")
    make_colour_dataset(root, "shapes-rgb", size=SIZE, levels=LEVELS)
    make_colour_dataset(root, "shapes-rgb1", size=SIZE, levels=LEVELS, labelled=False)
    make_colour_dataset(root, "shapes-cap", size=SIZE, levels=LEVELS, captions=True)
    return root


@pytest.fixture(scope="module")
def gpt(root):
    metrics = transformer.train(GPT_KEY, tiny_params(), root)
    assert metrics["perf/train_steps"] == 3 and math.isfinite(metrics["train/loss"])
    return transformer.load_model(GPT_KEY, root)


@pytest.fixture(scope="module")
def encdec(root):
    metrics = captions_encdec.train(ENC_KEY, tiny_params(), root)
    assert metrics["perf/train_steps"] == 3 and math.isfinite(metrics["train/loss"])
    return captions_encdec.load_model(ENC_KEY, root)


def on_levels(x: np.ndarray) -> bool:
    return bool(x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
                and np.allclose(x * (LEVELS - 1), np.round(x * (LEVELS - 1)), atol=1e-5))


# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------

def test_grey_token_sequence_is_the_raster_flattening_it_always_was():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, (3, 8, 8)).astype(np.uint8)
    y = np.array([0, 4, 9])
    seq = transformer.image_sequences(x, y, 17)
    explicit = [[17 + int(y[n])] + [int(x[n, i, j]) for i in range(8) for j in range(8)] for n in range(3)]
    assert seq.dtype == np.int64 and seq.tolist() == explicit
    assert image_tokens(x).tobytes() == x.reshape(3, -1).astype(np.int64).tobytes()
    assert np.array_equal(tokens_to_images(image_tokens(x), 8), x)
    assert tokens_to_nchw(image_tokens(x), 8).shape == (3, 1, 8, 8)


def test_colour_tokens_put_each_pixels_channels_together():
    x = np.random.default_rng(1).integers(0, 16, (2, 4, 4, 3)).astype(np.uint8)
    tokens = image_tokens(x)
    explicit = [[int(x[n, i, j, c]) for i in range(4) for j in range(4) for c in range(3)] for n in range(2)]
    assert tokens.shape == (2, 48) and tokens.tolist() == explicit          # R, G, B of pixel 0, then pixel 1
    assert np.array_equal(tokens_to_images(tokens, 4, 3), x)
    assert np.array_equal(tokens_to_nchw(tokens, 4, 3), x.transpose(0, 3, 1, 2))
    seq = transformer.image_sequences(x, np.array([1, 0]), 16)
    assert seq[:, 0].tolist() == [17, 16] and np.array_equal(seq[:, 1:], tokens)


def test_block_size_too_small_for_a_colour_image_is_one_line_naming_the_field(root):
    mc = tiny_params(block_size=D - 1).models[GPT_KEY]
    with pytest.raises(DataError, match=rf"^models\.{GPT_KEY}\.gpt\.block_size: {D - 1} .*3 channels.*"
                                        rf"set it to at least {D}$") as e:
        transformer.model_config(GPT_KEY, mc, data.load_manifest("shapes-rgb", root), root)
    assert "\n" not in str(e.value)


def test_target_len_must_be_the_colour_value_count(root):
    mc = tiny_params(target_len=64).models[ENC_KEY]
    with pytest.raises(captions_encdec.CaptionsEncDecError,
                       match=rf"encdec\.target_len: 64.*{D} values \(8x8 pixels x 3 channels\); set it to {D}$"):
        captions_encdec.model_config(ENC_KEY, mc, data.load_manifest("shapes-cap", root), root)


def test_manifest_channels_must_match_the_arrays(root, tmp_path):
    import json
    import shutil

    shutil.copytree(root / "data" / "prepared" / "shapes-rgb", tmp_path / "data" / "prepared" / "shapes-rgb")
    path = tmp_path / "data" / "prepared" / "shapes-rgb" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "channels": 1}))
    with pytest.raises(ModelError, match="manifest says 1 channel.*prepare the dataset again"):
        transformer.model_config(GPT_KEY, tiny_params().models[GPT_KEY], data.load_manifest("shapes-rgb", tmp_path),
                                 tmp_path)


# ---------------------------------------------------------------------------
# The pixel GPT on colour
# ---------------------------------------------------------------------------

def test_colour_gpt_trains_on_rgb_tokens_and_samples_rgb_images(root, gpt):
    model, config = gpt
    assert config["channels"] == 3 and config["levels"] == LEVELS and config["vocab_size"] == LEVELS + 3
    assert "labelled" not in config
    mc = tiny_params().models[GPT_KEY]
    get_batch, items = transformer.training_data(GPT_KEY, mc, config, root)
    xb, yb = get_batch(0, torch.Generator().manual_seed(0))
    assert items == 4 * D and xb.shape == yb.shape == (4, D)
    x_train, _ = data.load_images("shapes-rgb", "train", root)
    assert any(np.array_equal(image_tokens(x_train[i:i + 1])[0], yb[0].numpy()) for i in range(len(x_train)))
    assert transformer.tokens_per_sequence(config) == D

    images = transformer.sample_images(model, config, np.array([0, 1, 2, 2]), seed=0)
    assert images.shape == (4, SIZE, SIZE, 3) and on_levels(images)
    again = transformer.sample_images(model, config, np.array([0, 1, 2, 2]), seed=0, use_cache=False)
    assert np.array_equal(images, again)                       # the cache changes nothing


def test_colour_bits_per_dim_divide_by_every_channel_value():
    # every weight 0: logits 0, each of the H*W*C values uniform over the levels, exactly log2(levels) bits
    from components.models.gpt import GPT

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=D), LEVELS + 2).eval()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    config = {"levels": LEVELS, "num_classes": 2, "image_size": SIZE, "channels": 3}
    x, y = colour_arrays(2, SIZE, LEVELS, classes=("red", "blue"))
    ll = transformer.image_log_likelihoods(model, config, x)
    assert ll == pytest.approx(np.full((4, 2), -D * math.log(LEVELS)))
    out = transformer.image_bits_per_dim(ll, np.array([0.5, 0.5]), y, dims=int(np.prod(x.shape[1:])))
    assert out["eval/bits_per_dim"] == pytest.approx(math.log2(LEVELS))


def test_colour_inpainting_keeps_every_channel_of_the_kept_pixels(root, gpt):
    from components.evaluation.editing import inpaint_masks

    model, config = gpt
    x, _ = data.load_images("shapes-rgb", "test", root)
    keep = inpaint_masks(3, SIZE, SIZE, ("bottom",))["bottom"]                    # (3, 8, 8): one value a pixel
    out = transformer.complete_prefix(model, config, x[:3], keep, seed=0)
    assert out.shape == (3, SIZE, SIZE, 3) and on_levels(out)
    np.testing.assert_array_equal(np.round(out[:, :4] * (LEVELS - 1)), x[:3, :4])   # top 4 rows, R G B
    with pytest.raises(ModelError, match="prefix in raster order"):
        transformer.complete_prefix(model, config, x[:3], inpaint_masks(3, SIZE, SIZE, ("left",))["left"])
    with pytest.raises(ModelError, match="one value per pixel"):
        transformer.complete_prefix(model, config, x[:3], np.repeat(keep[..., None], 3, -1))


def test_unlabelled_colour_data_trains_unconditionally_on_one_class_token(root):
    transformer.train(UNL_KEY, tiny_params(), root)
    model, config = transformer.load_model(UNL_KEY, root)
    assert config["labelled"] is False and config["num_classes"] == 1 and config["vocab_size"] == LEVELS + 1
    assert config["class_prior"] == [1.0]
    get_batch, _ = transformer.training_data(UNL_KEY, tiny_params().models[UNL_KEY], config, root)
    xb, _ = get_batch(0, torch.Generator().manual_seed(0))
    assert (xb[:, 0] == LEVELS).all()                                             # the one class token
    assert transformer.sample_images(model, config, np.zeros(2, np.int64)).shape == (2, SIZE, SIZE, 3)


def test_long_images_are_batched_by_tokens_and_grey_8x8_keeps_its_batches():
    grey, rgb64 = {"image_size": 8}, {"image_size": 64, "channels": 3}
    assert transformer.image_batch(512, grey) == 512 and transformer.image_batch(512, rgb64) == 2
    assert captions_encdec.eval_batch({"encdec": {"target_len": 64}}) == captions_encdec.EVAL_BATCH
    assert captions_encdec.eval_batch({"encdec": {"target_len": 64 * 64 * 3}}) == 1


def test_flops_of_a_long_context_extrapolate_the_counts_of_two_shorter_ones(monkeypatch):
    from components.models.gpt import GPT

    net = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=D), LEVELS + 2)
    config = {"kind": "image", "image_size": SIZE, "channels": 3, "gpt": {"block_size": D}}
    exact = transformer.flops_per_item(net, config)                    # counted at T = 192
    monkeypatch.setattr(transformer, "FLOP_COUNT_MAX_TOKENS", 64)      # counted at 32 and 64, extrapolated
    assert transformer.flops_per_item(net, config) == pytest.approx(exact, rel=1e-9)


# ---------------------------------------------------------------------------
# captions-encdec on colour
# ---------------------------------------------------------------------------

def test_colour_encdec_writes_rgb_values_given_a_prompt(root, encdec):
    net, config = encdec
    assert config["channels"] == 3 and config["allowed_tokens"] == LEVELS
    _, tgt_out = captions_encdec.pixel_tensors(config, data.load_images("shapes-cap", "train", root)[0][:2])
    assert tgt_out.shape == (2, D)
    a = captions_encdec.sample_prompts(net, config, ["a red square", "a blue bar"], seed=1)
    assert a.shape == (2, SIZE, SIZE, 3) and on_levels(a)
    assert np.array_equal(a, captions_encdec.sample_prompts(net, config, ["a red square", "a blue bar"], seed=1,
                                                            cache="none"))


def test_colour_encdec_nll_counts_every_channel_value():
    from components.models.encdec import EncDec

    config = {"levels": LEVELS, "vocab": "abc ", "encdec": {"source_len": 8, "target_len": D}, "bos_id": LEVELS + 7}
    net = EncDec(EncDecConfig(n_layer_enc=1, n_layer_dec=1, n_head=2, n_embd=16, source_len=8, target_len=D),
                 LEVELS + 8).eval()
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    x, _ = colour_arrays(1, SIZE, LEVELS, classes=("red", "blue"))
    nats = captions_encdec.pixel_nll(net, config, x, ["a b", "cab"])
    assert nats == pytest.approx(2 * D * math.log(LEVELS), rel=1e-5)


# ---------------------------------------------------------------------------
# Export and torch-free sampling
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(root, gpt, encdec):
    for key, (net, config) in ((GPT_KEY, gpt), (ENC_KEY, encdec)):
        assert export_model(key, net, config, ExportConfig(), root, exporter="torchscript")["passed"]
    return root


def test_colour_gpt_export_samples_rgb_on_onnxruntime_with_parity(exported, gpt):
    model, config = gpt
    engine = load_engine(exported / "exports" / GPT_KEY)
    assert engine.config["channels"] == 3
    levels = engine.sample_digits([0, 1, 2], seed=0)
    assert levels.shape == (3, 3, SIZE, SIZE) and levels.dtype == np.uint8 and levels.max() < LEVELS
    images = engine.sample_images([0, 1, 2], seed=0)
    assert images.shape == (3, SIZE, SIZE, 3) and on_levels(images)
    assert np.array_equal(images, levels.transpose(0, 2, 3, 1) / np.float32(LEVELS - 1))
    # one step, torch against onnxruntime: the logits of a whole colour image's tokens
    x, y = data.load_images("shapes-rgb", "test", exported)
    ids = transformer.image_sequences(x[:2], y[:2], LEVELS)[:, :-1]
    got, _ = engine.forward(ids, engine.empty_past(2))
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(ids), use_cache=False)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
    # a completion of a colour image's top: the kept pixels' channels come back as given
    prefix = x[0].reshape(-1, 3)[:SIZE * 4]                                          # (P, C) first 4 rows
    out = engine.sample_images([int(y[0])] * 2, prefix=prefix, seed=0)
    assert np.array_equal(np.round(out[:, :4] * (LEVELS - 1)), np.stack([x[0, :4]] * 2))


def test_colour_encdec_export_samples_rgb_on_onnxruntime(exported):
    from components.inference.encdec import load_encdec_engine

    engine = load_encdec_engine(exported / "exports" / ENC_KEY)
    assert engine.config["channels"] == 3 and engine.target_len == D
    levels = engine.sample_prompts(["a red square", "a green disc"], seed=0)
    assert levels.shape == (2, 3, SIZE, SIZE) and levels.max() < LEVELS
    images = engine.sample_images(["a red square"], seed=0)
    assert images.shape == (1, SIZE, SIZE, 3) and on_levels(images)


def test_colour_sampling_from_the_exports_never_imports_torch(exported):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from components.inference import load_engine\n"
        "from components.inference.encdec import load_encdec_engine\n"
        f"root = Path({str(exported)!r})\n"
        f"a = load_engine(root / 'exports' / {GPT_KEY!r}).sample_images([0, 1], seed=0)\n"
        f"b = load_encdec_engine(root / 'exports' / {ENC_KEY!r}).sample_images(['a blue bar'], seed=0)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(a.shape, b.shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"(2, {SIZE}, {SIZE}, 3) (1, {SIZE}, {SIZE}, 3)"


def test_serving_writes_a_colour_image_as_an_rgb_png(exported):
    import base64
    import io

    from PIL import Image

    from components.serving.generate import png_base64

    engine = load_engine(exported / "exports" / GPT_KEY)
    levels = engine.sample_digits([2], seed=3)[0]                                    # (3, 8, 8)
    img = Image.open(io.BytesIO(base64.b64decode(png_base64(levels, LEVELS))))
    assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    want = np.round(levels.transpose(1, 2, 0) * (255 / (LEVELS - 1))).astype(np.uint8)
    assert np.array_equal(np.asarray(img), want)
    grey = Image.open(io.BytesIO(base64.b64decode(png_base64(levels[:1], LEVELS))))
    assert grey.mode == "L" and grey.size == (SIZE, SIZE)


def test_encdec_refuses_images_that_disagree_with_the_manifests_channels(root, tmp_path):
    import json
    import shutil

    shutil.copytree(root / "data" / "prepared" / "shapes-cap", tmp_path / "data" / "prepared" / "shapes-cap")
    path = tmp_path / "data" / "prepared" / "shapes-cap" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "channels": 1}))
    mc = tiny_params(target_len=64).models[ENC_KEY]
    config = captions_encdec.model_config(ENC_KEY, mc, data.load_manifest("shapes-cap", tmp_path), tmp_path)
    with pytest.raises(captions_encdec.CaptionsEncDecError, match=r"\(8, 8, 3\) \(192 values\).*prepare the dataset"):
        captions_encdec.training_data(ENC_KEY, mc, config, tmp_path)
