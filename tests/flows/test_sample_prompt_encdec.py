"""A tiny captions-encdec exported (encoder + cached decoder step, parity-gated) and sampled torch-free:
`genflow sample MODEL --prompt TEXT` writes a PNG grid, the same pixels as PyTorch, bad prompts in one line."""
import json
from argparse import Namespace

import numpy as np
import pytest
import torch

from components.config import ExportConfig
from components.errors import GenflowError
from components.export import export_model
from components.families import captions_encdec as fam
from components.inference import EncDecEngine, load_engine
from components.tokenizer import PromptTokenizer
from flows.sample import sample_cli
from serving_models import sample_without_torch

KEY = "captions-encdec"
VOCAB = " ,-acdefghiklnoprstuvwxz"
TOK = PromptTokenizer(VOCAB, 24)
LEVELS = 17
CONFIG = {"backbone": "encdec-pixels", "family": "transformer", "model": KEY, "dataset": "digits-captions",
          "kind": "image", "image_size": 8, "channels": 1, "levels": LEVELS, "classes": list("0123456789"),
          "num_classes": 10, "vocab": VOCAB, "vocab_size": LEVELS + TOK.vocab_size + 1,
          "bos_id": LEVELS + TOK.vocab_size, "eos_id": LEVELS + TOK.vocab_size, "start_id": LEVELS + TOK.start_id,
          "pad_id": LEVELS + TOK.pad_id, "allowed_tokens": LEVELS,
          "encdec": {"n_layer_enc": 1, "n_layer_dec": 2, "n_head": 2, "n_embd": 16, "source_len": 24,
                     "target_len": 64, "dropout": 0.0, "bias": False, "truncate_source": False},
          "sample": {"temperature": 1.0, "top_k": 0}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    torch.manual_seed(0)
    net = fam.build_network(CONFIG)
    for p in net.parameters():   # a freshly initialised net barely reads its prompt
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.05)
    result = export_model(KEY, net.eval(), CONFIG, ExportConfig(), root)
    return root, net, result


def args(**kw):
    base = dict(model=KEY, count=3, out=None, label=None, steps=None, guidance=None, prompt="a thick slanted seven",
                length=None, temperature=None, top_k=None, seed=0, exports=None, inpaint=None, mask=None, jump=None,
                resample=None, resize=False, upscale=None)
    return Namespace(**{**base, **kw})


def test_both_graphs_export_and_pass_the_parity_gate(exported):
    root, _, result = exported
    assert result["passed"], result.get("reason")
    names = {c["name"].split(",")[0] for c in result["checks"]}
    assert names == {"encoder", "decoder step"}
    config = json.loads((root / "exports" / KEY / "config.json").read_text())
    assert config["graph"] == "encoder_decoder" and config["kind"] == "image"
    assert config["allowed_tokens"] == LEVELS and config["prompt_offset"] == LEVELS
    assert [i["name"] for i in config["inputs"]] == ["input_ids", "past_kv", "cross_kv", "src_mask"]


def test_the_engine_writes_the_pixels_pytorch_writes_and_reads_the_prompt(exported):
    root, net, _ = exported
    engine = load_engine(root / "exports" / KEY)
    assert isinstance(engine, EncDecEngine)
    prompts = ["a thick slanted seven", "a thin upright one"]
    got = engine.sample_prompts(prompts, top_k=1)                       # top-1: the same draw on both sides
    ref = fam.sample_prompts(net, CONFIG, prompts, top_k=1)
    assert got.shape == (2, 1, 8, 8) and got.max() < LEVELS
    assert np.array_equal(got[:, 0], np.round(ref * (LEVELS - 1)).astype(np.int64))
    assert not np.array_equal(got[0], got[1])                          # another prompt, another image
    with pytest.raises(GenflowError, match=r"^--source: captions-encdec draws images of a prompt"):
        engine.transduce(["a seven"])
    for cache in ("self", "none"):                                     # caches change nothing
        assert np.array_equal(ref, fam.sample_prompts(net, CONFIG, prompts, top_k=1, cache=cache))


def test_genflow_sample_writes_a_png_grid(exported, tmp_path):
    root, _, _ = exported
    out = sample_cli(args(exports=str(root / "exports")), tmp_path)
    assert out == tmp_path / "reports" / "samples" / f"{KEY}-local.png" and out.is_file()


@pytest.mark.parametrize("kw,match", [
    (dict(prompt=""), r"prompt"), (dict(prompt="a thick seven!"), r"'!'"), (dict(prompt="a" * 40), r"prompt"),
    (dict(prompt=None), r"^--prompt: captions-encdec draws images of a caption; give one"),
    (dict(guidance=2.0), r"^--guidance: captions-encdec .* has no such setting"),
    (dict(steps=5), r"^--steps: captions-encdec .* has no such setting"),
    (dict(temperature=0.0), r"^--temperature: must be > 0")])
def test_bad_requests_are_refused_in_one_line(exported, tmp_path, kw, match):
    root, _, _ = exported
    with pytest.raises(GenflowError, match=match) as e:
        sample_cli(args(exports=str(root / "exports"), **kw), tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "reports").exists()


def test_sampling_from_a_prompt_never_imports_torch(exported, tmp_path):
    root, _, _ = exported
    sample_without_torch(tmp_path, model=KEY, prompt="a thick slanted seven", exports=str(root / "exports"))
    assert (tmp_path / "reports" / "samples" / f"{KEY}-local.png").is_file()


def test_serving_plans_and_runs_prompt_requests_as_genflow_sample_draws_them(exported):
    from components.serving.generate import Limits, RequestProblem, plan, png_base64, run_jobs
    from components.serving.models import smoke_check

    root, _, _ = exported
    engine = load_engine(root / "exports" / KEY)
    smoke_check(engine)
    job = plan(engine, {"prompt": "a thick seven", "n": 2, "seed": 3, "top_k": 4}, Limits(max_n=8, max_length=64))
    [images] = run_jobs(engine, [job])
    alone = engine.sample_prompts(["a thick seven"] * 2, top_k=4, seed=3)
    assert images == [png_base64(x, LEVELS) for x in alone]
    for body, field in (({"prompt": ""}, "prompt"), ({"prompt": "a seven!"}, "prompt"), ({"n": 1}, "prompt"),
                        ({"prompt": "a seven", "steps": 3}, "steps"), ({"prompt": "a seven", "top_k": 99}, "top_k")):
        with pytest.raises(RequestProblem) as e:
            plan(engine, body, Limits(max_n=8, max_length=64))
        assert e.value.detail[0]["field"] == field, body
