"""captions-encdec end to end with a tiny encoder-decoder: train through the one training entry,
evaluate with captions-unet's metric names, decode with and without caches, refuse bad prompts."""
import json

import numpy as np
import pytest
import torch

from components import data
from components.config import (
    DatasetConfig,
    EncDecConfig,
    EvalConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TrainConfig,
    hash_json,
    load_params,
)
from components.families import captions_encdec as fam
from components.families.registry import backbone
from components.tokenizer import PromptError, UnknownCharactersError

KEY = "tiny-captions-encdec"


def tiny_params(**encdec) -> Params:
    model = ModelConfig(
        family="transformer", backbone="encdec-pixels", dataset="digits-captions",
        encdec=EncDecConfig(**{"n_layer_enc": 1, "n_layer_dec": 1, "n_head": 2, "n_embd": 16, "source_len": 65,
                               "target_len": 64, **encdec}),
        train=TrainConfig(max_steps=3, max_seconds=0, batch_size=8, warmup_steps=1, log_every=1,
                          checkpoint_every=2, threads=1),
        sample=SampleConfig(temperature=1.0), eval=EvalConfig(num_samples=20))
    cfg = DatasetConfig(source="builtin:digits-captions", kind="captions")
    return Params(datasets={"digits-captions": cfg}, models={KEY: model})


@pytest.fixture(scope="session")
def captions_root(session_tmp):
    root = session_tmp / "captions-root"
    if not (root / "data" / "prepared" / "digits-captions" / "manifest.json").exists():
        cfg = tiny_params().datasets["digits-captions"]
        data.ingest("digits-captions", cfg, root)
        data.prepare("digits-captions", cfg, root)
    return root


@pytest.fixture(scope="module")
def trained(captions_root):
    return fam.train(KEY, tiny_params(), captions_root)


@pytest.fixture(scope="module")
def model(captions_root, trained):
    return fam.load_model(KEY, captions_root)


def test_train_runs_through_the_one_training_entry(captions_root, trained):
    assert trained["perf/train_steps"] == 3 and np.isfinite(trained["train/loss"])
    assert trained["perf/flops_per_item"] > 2 * trained["perf/params"]
    ckpt = torch.load(captions_root / "models" / KEY / "model.pt", weights_only=True)
    config = json.loads(json.dumps(ckpt["config"]))
    assert config["backbone"] == "encdec-pixels" and config["encdec"]["target_len"] == 64
    assert config["vocab"] == data.load_manifest("digits-captions", captions_root)["vocab"]
    assert config["allowed_tokens"] == config["levels"] == 17


def test_batches_are_each_images_pixels_and_one_of_its_captions(captions_root):
    mc = tiny_params().models[KEY]
    config = fam.model_config(KEY, mc, data.load_manifest("digits-captions", captions_root), captions_root)
    get_batch, items = fam.training_data(KEY, mc, config, captions_root)
    src, mask, tgt_in, tgt_out = get_batch(0, torch.Generator().manual_seed(0))
    assert items == 8 * 64 and tgt_out.shape == (8, 64) and int(tgt_out.max()) < config["levels"]
    assert (tgt_in[:, 0] == config["bos_id"]).all() and torch.equal(tgt_in[:, 1:], tgt_out[:, :-1])
    assert mask[:, -1].any() and src.shape[1] < config["encdec"]["source_len"]   # cut to the longest prompt
    x_train, _ = data.load_images("digits-captions", "train", captions_root)
    records = data.load_captions("digits-captions", "train", captions_root)
    tok = fam.tokenizer(config)
    for row in range(8):
        j = next(i for i in range(len(x_train)) if np.array_equal(x_train[i].reshape(-1), tgt_out[row].numpy()))
        ids = (src[row][mask[row]] - config["levels"]).numpy()
        assert tok.decode(ids[1:]) in records[j]["texts"]


def test_prompt_changes_the_image_and_caches_change_nothing(model):
    net, config = model
    a = fam.sample_prompts(net, config, ["a thick slanted seven"], seed=1)
    assert a.shape == (1, 8, 8)
    x = np.round(a * 16).astype(np.int64)                     # the same pixels, scored under two prompts
    src, mask = fam.prompt_tensors(config, ["a thick slanted seven", "a thin upright one"])
    tgt_in, _ = fam.pixel_tensors(config, np.concatenate([x, x]))
    with torch.inference_mode():
        logits = fam.pixel_logits(net, config, src, mask, tgt_in)
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3
    for cache in ("self", "none"):
        assert np.array_equal(a, fam.sample_prompts(net, config, ["a thick slanted seven"], seed=1, cache=cache))
    assert set(np.unique(a * 16).round(4)) <= set(range(17))


def test_evaluate_reports_captions_unet_metric_names(captions_root, trained):
    m = fam.evaluate(KEY, tiny_params(), captions_root)
    for k in ("eval/fd", "eval/prompt_acc", "eval/attribute_error", "baseline/real_attribute_error",
              "baseline/label_only_attribute_error", "baseline/real_fd", "perf/sample_ms_per_item",
              "eval/bits_per_dim"):
        assert np.isfinite(m[k]), k
    assert 0 < m["eval/bits_per_dim"] < 3 * m["baseline/uniform_bits_per_dim"]
    assert (captions_root / "reports" / KEY / "samples.png").is_file()


@pytest.mark.parametrize("prompt,error,match", [
    ("", PromptError, "empty"), ("a thick seven!", UnknownCharactersError, "!"),
    ("a" * 80, PromptError, "65|64")])
def test_bad_prompts_are_refused_in_one_line(model, prompt, error, match):
    net, config = model
    with pytest.raises(error, match=match) as e:
        fam.sample_prompts(net, config, [prompt])
    assert "\n" not in str(e.value)


def test_target_len_must_be_the_pixel_count(captions_root):
    mc = tiny_params(target_len=63).models[KEY]
    with pytest.raises(fam.CaptionsEncDecError, match=r"encdec.target_len: 63.*set it to 64"):
        fam.model_config(KEY, mc, data.load_manifest("digits-captions", captions_root), captions_root)


def test_params_entry_and_registry():
    params = load_params()
    mc = params.models["captions-encdec"]
    assert mc.enabled is False and mc.train.max_seconds <= 270 and mc.dataset == "digits-captions"
    assert params.promotion.rules["captions-encdec"].metric == "eval/attribute_error"
    assert "textenc" not in params.to_dict()["models"]["captions-encdec"]
    assert params.section_hash("models", "pydoc-seq2seq") == hash_json(params.to_dict()["models"]["pydoc-seq2seq"])
    entry = backbone("encdec-pixels")
    assert entry.family() is fam and entry.data_kinds == ("captions",)
