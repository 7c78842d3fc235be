"""The pixel GPT's and the prompt-to-pixels encoder-decoder's engines on colour exports: onnxruntime
against PyTorch step by step, the (N, C, H, W) levels and (N, H, W, C) images they return, the
colour prefix, and grey exports unchanged."""
import numpy as np
import pytest
import torch

from components.config import EncDecConfig, ExportConfig, GPTConfig, ModelConfig, SampleConfig
from components.export import ExportError, export_model
from components.families import captions_encdec
from components.inference import load_engine
from components.inference.encdec import load_encdec_engine
from components.models.gpt import GPT
from components.sampling.requests import SamplingRequestError

LEVELS, SIZE, CLASSES = 4, 4, 2
D = SIZE * SIZE * 3                    # 48 tokens an image
GPT_CONFIG = {"backbone": "gpt", "family": "transformer", "kind": "image", "levels": LEVELS,
              "num_classes": CLASSES, "image_size": SIZE, "channels": 3}
GREY_CONFIG = {**GPT_CONFIG, "channels": 1}


def _noisy(net):
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour-exports")
    nets = {"rgb-gpt": (_noisy(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=D), LEVELS + CLASSES)),
                        GPT_CONFIG),
            "grey-gpt": (_noisy(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=17), LEVELS + CLASSES)),
                         GREY_CONFIG)}
    mc = ModelConfig(family="transformer", backbone="encdec-pixels", dataset="rgb-cap",
                     encdec=EncDecConfig(n_layer_enc=1, n_layer_dec=1, n_head=2, n_embd=16, source_len=8,
                                         target_len=D), sample=SampleConfig(temperature=1.0))
    manifest = {"name": "rgb-cap", "kind": "captions", "image_size": SIZE, "levels": LEVELS, "channels": 3,
                "classes": ["a", "b"], "vocab": " abcd", "max_caption_chars": 7}
    config = captions_encdec.model_config("rgb-encdec", mc, manifest)
    nets["rgb-encdec"] = (_noisy(captions_encdec.build_network(config)), config)
    for key, (net, cfg) in nets.items():
        assert export_model(key, net, cfg, ExportConfig(), root, exporter="torchscript")["passed"], key
    return root, nets


def test_gpt_engine_steps_match_pytorch_on_a_colour_image(exports):
    root, nets = exports
    model = nets["rgb-gpt"][0]
    engine = load_engine(root / "exports" / "rgb-gpt")
    assert engine.config["channels"] == 3 and engine.config["block_size"] == D
    ids = np.random.default_rng(0).integers(0, LEVELS, (3, D)).astype(np.int64)
    ids[:, 0] = LEVELS + np.array([0, 1, 1])                                    # class tokens
    logits, past = engine.forward(ids[:, :-1], engine.empty_past(3))           # prefill
    step, _ = engine.forward(ids[:, -1:], past)                                # one decode step
    with torch.no_grad():
        ref, ref_past = model(torch.from_numpy(ids[:, :-1]), model.empty_cache(3))
        ref_step, _ = model(torch.from_numpy(ids[:, -1:]), ref_past)
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(step, ref_step.numpy(), atol=1e-4)


def test_gpt_engine_returns_nchw_levels_and_channels_last_images(exports):
    root, _ = exports
    engine = load_engine(root / "exports" / "rgb-gpt")
    levels = engine.sample_digits([0, 1, 1, 0], seed=2)
    assert levels.shape == (4, 3, SIZE, SIZE) and levels.dtype == np.uint8 and levels.max() < LEVELS
    images = engine.sample_images([0, 1, 1, 0], seed=2)
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.float32
    assert np.array_equal(images * (LEVELS - 1), levels.transpose(0, 2, 3, 1).astype(np.float32))
    assert len(np.unique(levels)) > 1                                          # not a constant image


def test_colour_prefix_keeps_whole_pixels_and_refuses_a_split_pixel(exports):
    root, _ = exports
    engine = load_engine(root / "exports" / "rgb-gpt")
    prefix = np.random.default_rng(3).integers(0, LEVELS, (SIZE * 2, 3))      # the top two rows, R G B each
    out = engine.sample_digits([1, 1, 1], prefix=prefix, seed=0)               # (3, 3, H, W)
    top = out.transpose(0, 2, 3, 1).reshape(3, -1, 3)[:, :SIZE * 2]
    assert np.array_equal(top, np.stack([prefix] * 3))
    with pytest.raises(SamplingRequestError, match="^prefix: .*all channels of a kept pixel"):
        engine.sample_digits([1], prefix=prefix.reshape(-1)[:7])
    with pytest.raises(SamplingRequestError, match="^prefix: "):
        engine.sample_digits([1], prefix=np.zeros((SIZE * SIZE, 3)))           # the whole image: nothing to write


def test_grey_gpt_exports_still_return_one_channel(exports):
    root, _ = exports
    engine = load_engine(root / "exports" / "grey-gpt")
    assert engine.config["channels"] == 1
    levels = engine.sample_digits([0, 1], seed=0)
    assert levels.shape == (2, 1, SIZE, SIZE)
    images = engine.sample_images([0, 1], seed=0)
    assert images.shape == (2, SIZE, SIZE) and np.array_equal(images * (LEVELS - 1), levels[:, 0].astype(np.float32))


def test_export_refuses_a_context_shorter_than_a_colour_image(tmp_path):
    net = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=D - 1), LEVELS + CLASSES).eval()
    with pytest.raises(ExportError, match=rf"^gpt\.block_size: {D - 1} .*set it to at least {D}$"):
        export_model("short", net, GPT_CONFIG, ExportConfig(), tmp_path, exporter="torchscript")


def test_encdec_engine_steps_match_pytorch_and_write_colour_images(exports):
    root, nets = exports
    net, config = nets["rgb-encdec"]
    engine = load_encdec_engine(root / "exports" / "rgb-encdec")
    assert engine.config["channels"] == 3 and engine.target_len == D
    src, mask = captions_encdec.prompt_tensors(config, ["a cab"])
    cross = engine.encoder.run(["cross_kv"], {"src_ids": src.numpy(), "src_mask": mask.numpy()})[0]
    tgt = np.random.default_rng(4).integers(0, LEVELS, (1, 6)).astype(np.int64)
    tgt[:, 0] = config["bos_id"]
    past = np.zeros((engine.L, 2, 1, engine.H, 0, engine.D), np.float32)
    logits, _ = engine.session.run(["logits", "present_kv"], {"input_ids": tgt, "past_kv": past,
                                                               "cross_kv": cross, "src_mask": mask.numpy()})
    with torch.no_grad():
        ref_cross = net.encode(src, mask)
        ref, _ = net.decode(torch.from_numpy(tgt), ref_cross, mask, torch.from_numpy(past))
    np.testing.assert_allclose(cross, ref_cross.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)

    levels = engine.sample_prompts(["a cab", "dab"], seed=0)
    assert levels.shape == (2, 3, SIZE, SIZE) and levels.max() < LEVELS
    images = engine.sample_images(["a cab", "dab"], seed=0)
    assert images.shape == (2, SIZE, SIZE, 3)
    assert np.array_equal(images * (LEVELS - 1), levels.transpose(0, 2, 3, 1).astype(np.float32))
    assert engine.sample_prompts([], seed=0).shape == (0, 3, SIZE, SIZE)


def _png(b64: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_serving_answers_colour_models_with_rgb_pngs_of_the_sampled_levels(exports):
    from components.serving.generate import Job, run_jobs

    root, _ = exports
    gpt = load_engine(root / "exports" / "rgb-gpt")
    [pngs] = run_jobs(gpt, [Job("images", {"labels": [1, 0], "temperature": 1.0, "top_k": 0, "seed": 5}, n=2)])
    levels = gpt.sample_digits([1, 0], seed=5)
    for b64, lv in zip(pngs, levels):
        img = _png(b64)
        assert img.mode == "RGB" and img.size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(img), np.round(lv.transpose(1, 2, 0) * (255 / (LEVELS - 1))))
    encdec = load_encdec_engine(root / "exports" / "rgb-encdec")
    [pngs] = run_jobs(encdec, [Job("pixels", {"prompts": ["dab"], "temperature": 1.0, "top_k": 0, "seed": 0})])
    assert _png(pngs[0]).mode == "RGB" and _png(pngs[0]).size == (SIZE, SIZE)
    grey = load_engine(root / "exports" / "grey-gpt")
    [pngs] = run_jobs(grey, [Job("images", {"labels": [0], "temperature": 1.0, "top_k": 0, "seed": 0})])
    assert _png(pngs[0]).mode == "L"


def test_complete_image_keeps_the_top_rows_of_a_colour_image_and_refuses_other_masks(exports):
    root, _ = exports
    engine = load_engine(root / "exports" / "rgb-gpt")
    assert engine.image_shape == (3, SIZE, SIZE)
    image = np.random.default_rng(6).integers(0, LEVELS, (3, SIZE, SIZE))
    keep = np.zeros((SIZE, SIZE), dtype=bool)
    keep[:1] = True
    keep[1, :2] = True                                                          # the first 6 pixels
    out = engine.complete_image(image, keep, [0, 1], seed=0)
    assert out.shape == (2, 3, SIZE, SIZE)
    flat = out.transpose(0, 2, 3, 1).reshape(2, -1, 3)
    assert np.array_equal(flat[:, :6], np.stack([image.transpose(1, 2, 0).reshape(-1, 3)[:6]] * 2))
    assert np.array_equal(engine.complete_image(image, np.stack([keep] * 3), [0, 1], seed=0), out)
    with pytest.raises(SamplingRequestError, match="^--mask: .*raster order"):
        engine.complete_image(image, ~keep, [0])                                # keeps the bottom instead
    split = np.stack([keep] * 3)
    split[2, 0, 0] = False
    with pytest.raises(SamplingRequestError, match="^--mask: keeps some channels of a pixel"):
        engine.complete_image(image, split, [0])
    with pytest.raises(SamplingRequestError, match=r"^--inpaint: shape \(1, 4, 4\)"):
        engine.complete_image(image[:1], keep, [0])
