"""The captions family end to end with a tiny prompt-conditioned U-Net: train through the one training
entry, evaluate against guidance, sample from prompts, refuse bad prompts; params hashes of other models."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from components import data
from components.config import (
    CrossAttentionConfig,
    DatasetConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TextEncoderConfig,
    TrainConfig,
    UNetConfig,
    hash_json,
    load_params,
)
from components.families import captions as fam
from components.families.registry import backbone
from components.tokenizer import PromptError, UnknownCharactersError

KEY = "tiny-captions"


def tiny_params(**sample) -> Params:
    model = ModelConfig(
        family="diffusion", backbone="unet-text", dataset="digits-captions",
        unet=UNetConfig(channels=[8, 16], time_dim=16, groups=4),
        textenc=TextEncoderConfig(n_layer=1, n_head=2, n_embd=16, context=65),
        cross_attention=CrossAttentionConfig(from_level=1, heads=2),
        diffusion=DiffusionConfig(timesteps=10, schedule="cosine", p_uncond=0.2),
        train=TrainConfig(max_steps=3, max_seconds=0, batch_size=8, warmup_steps=1, log_every=1,
                          checkpoint_every=2, threads=1),
        sample=SampleConfig(**{"sampler": "ddim", "steps": 3, "guidance": 2.0, **sample}),
        eval=EvalConfig(num_samples=20, guidance_sweep=[0.0, 1.0]))
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


def test_train_runs_through_the_one_training_entry(captions_root, trained):
    assert trained["perf/train_steps"] == 3 and np.isfinite(trained["train/loss"])
    assert trained["perf/flops_per_item"] > 2 * trained["perf/params"]
    ckpt = torch.load(captions_root / "models" / KEY / "model.pt", weights_only=True)
    config = json.loads(json.dumps(ckpt["config"]))
    assert config["backbone"] == "unet-text" and config["textenc"]["n_embd"] == 16
    assert config["vocab"] == data.load_manifest("digits-captions", captions_root)["vocab"]
    assert any(k.startswith("text.") for k in ckpt["state_dict"])      # the encoder trained jointly, saved with it
    assert any(k.startswith("cross.") for k in ckpt["state_dict"])


def test_batches_draw_each_images_own_captions(captions_root):
    params = tiny_params()
    mc = params.models[KEY]
    config = fam.model_config(KEY, mc, data.load_manifest("digits-captions", captions_root), captions_root)
    get_batch, items = fam.training_data(KEY, mc, config, captions_root)
    records = data.load_captions("digits-captions", "train", captions_root)
    x_train, _ = data.load_images("digits-captions", "train", captions_root)
    tok = fam.tokenizer(config)
    scaled = fam.levels_to_model(x_train, 17)[:, 0]
    seen = set()
    for step in range(6):
        x0, ids = get_batch(step, torch.Generator().manual_seed(step))
        assert items == 8 and ids.shape[0] == 8 and (ids[:, 0] == tok.start_id).all()
        for row, image in zip(ids, x0):
            text = tok.decode([i for i in row.tolist() if i < tok.unk_id])
            same = np.flatnonzero((scaled == image[0].numpy()).all(axis=(1, 2)))   # the image's index (or copies)
            own = [t for j in same for t in records[j]["texts"]]
            assert text in own
            seen.add(own.index(text) % len(records[same[0]]["texts"]))
    assert len(seen) > 1                                                # not always the first phrasing


def test_batches_are_cut_to_their_longest_prompt_and_the_cut_changes_no_loss(captions_root):
    params = tiny_params()
    mc = params.models[KEY]
    config = fam.model_config(KEY, mc, data.load_manifest("digits-captions", captions_root), captions_root)
    get_batch, _ = fam.training_data(KEY, mc, config, captions_root)
    pad, context = config["pad_id"], config["textenc"]["context"]
    torch.manual_seed(0)
    net = fam.build_network(config).eval()
    lengths = set()
    for step in range(4):
        x0, ids = get_batch(step, torch.Generator().manual_seed(step))
        assert (ids[:, -1] != pad).any()                     # the longest prompt of the batch ends the columns
        lengths.add(ids.shape[1])
        padded = torch.cat([ids, torch.full((len(ids), context - ids.shape[1]), pad)], 1)
        losses = [fam.loss_fn(config)(net, (x0, p), torch.Generator().manual_seed(7)) for p in (ids, padded)]
        assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5, abs=1e-6)
    assert max(lengths) < context                           # shorter than the dataset-wide padding


def test_evaluate_reports_prompt_adherence_against_guidance(captions_root, trained):
    metrics = fam.evaluate(KEY, tiny_params(), captions_root)
    for name in ("eval/fd", "eval/prompt_acc", "eval/attribute_error", "perf/sample_ms_per_item",
                 "baseline/real_attribute_error", "baseline/label_only_attribute_error", "baseline/real_fd",
                 "eval/prompt_acc_g0", "eval/attribute_error_g1", "perf/sample_ms_per_item_g2"):
        assert np.isfinite(metrics[name]), name
    assert 0 <= metrics["eval/prompt_acc"] <= 1 and 0 <= metrics["eval/attribute_error"] <= 2
    assert metrics["baseline/real_attribute_error"] < 0.05   # the captions were measured on these very pixels
    out = captions_root / "reports" / KEY
    table = (out / "guidance.md").read_text()
    assert "| 0 |" in table and "| 2 |" in table and (out / "samples.png").exists()
    assert [r["guidance"] for r in json.loads((out / "guidance.json").read_text())["rows"]] == [0.0, 1.0, 2.0]


def test_attribute_error_counts_only_what_a_prompt_asks_for():
    cuts = {"ink": [0.2, 0.3], "slant": [-0.1, 0.1], "width": [0.3, 0.4]}
    thick = np.zeros((1, 8, 8), np.float32)
    thick[0, 1:7, 2:6] = 1.0                        # ink 0.375 (thick), upright, width ~0.28 (narrow)
    assert fam.attribute_error(thick, ["a thick seven"], 17, cuts) == 0.0
    assert fam.attribute_error(thick, ["a thin seven"], 17, cuts) == 2.0
    assert fam.attribute_error(thick, ["a thin, upright seven"], 17, cuts) == 1.0     # (2 + 0) / 2
    assert np.isnan(fam.attribute_error(thick, ["a seven"], 17, cuts))
    assert fam.label_only_prompt("a wide, thick, upright eight") == "an eight"


def test_sampling_follows_prompts_and_refuses_bad_ones_in_one_line(captions_root, trained):
    net, config = fam.load_model(KEY, captions_root)
    a = fam.sample_prompts(net, config, ["a thick seven", "a thin zero"], steps=3, guidance=2.0)
    b = fam.sample_prompts(net, config, ["a thick seven", "a thin zero"], steps=3, guidance=2.0)
    assert a.shape == (2, 8, 8) and np.array_equal(a, b)
    for bad, error, start in (("", PromptError, "prompt: empty; "),
                              ("a THICK seven", UnknownCharactersError, "prompt: 5 character(s) the text encoder"),
                              ("a" * 80, PromptError, "prompt: 80 characters, longer than the text encoder's")):
        with pytest.raises(error) as e:
            fam.sample_prompts(net, config, ["a seven", bad], steps=3)
        assert str(e.value).startswith(start) and "\n" not in str(e.value)


def test_a_captions_model_needs_a_captions_dataset(digits_root):
    params = tiny_params()
    pattern = r"^models.tiny-captions.dataset: digits-captions holds image data; a prompt-conditioned"
    with pytest.raises(fam.CaptionsFamilyError, match=pattern):
        fam.model_config(KEY, params.models[KEY], data.load_manifest("digits", digits_root), digits_root)


def test_the_new_sections_leave_other_models_params_hashes_as_they_were(project_root):
    params = load_params(project_root / "params.yaml")
    for key, m in params.models.items():
        if m.textenc is None:
            before = dataclasses.asdict(m)       # the section as it was before these optional fields existed
            assert before.pop("textenc") is None and before.pop("cross_attention") is None
            assert before["eval"].pop("guidance_sweep") is None
            if before["train"]["adam_beta2"] is None:   # unset: as before the key existed
                del before["train"]["adam_beta2"]
            assert params.section_hash("models", key) == hash_json(before)
    with_textenc = dataclasses.asdict(params.models["captions-unet"])
    assert with_textenc["train"]["adam_beta2"] == 0.95    # set: it enters the hash like any other key
    assert params.section_hash("models", "captions-unet") == hash_json(with_textenc)
    assert params.models["captions-unet"].enabled is False
    assert params.models["captions-unet"].train.max_seconds <= 300
    assert params.promotion.rules["captions-unet"].metric == "eval/attribute_error"
    assert "textenc" in params.to_dict()["models"]["captions-unet"]
    entry = backbone("unet-text")
    assert entry.module == "captions" and "components/models/unet.py" in entry.code_paths


def test_a_text_section_on_a_model_that_ignores_it_is_refused_in_one_line(project_root):
    from components.config import ParamsError

    with pytest.raises(ParamsError, match=r"^models.digits-unet.textenc: backbone unet does not read it \(only "
                                          r"unet-text does\); drop the section"):
        load_params(project_root / "params.yaml", ["models.digits-unet.textenc.n_layer=1"])
