"""A tiny prompt-conditioned U-Net exported (text encoder + conditional denoiser, parity-gated) and sampled
torch-free: `genflow sample MODEL --prompt TEXT`, the same images as PyTorch, bad prompts in one line."""
import json
from argparse import Namespace

import numpy as np
import pytest
import torch

from components.config import ExportConfig
from components.errors import GenflowError
from components.export import export_model
from components.families import captions as fam
from components.inference import TextDiffusionEngine, load_engine
from flows.sample import sample_cli
from serving_models import sample_without_torch

VOCAB = " ,-acdefghiklnoprstuvwxz"
CONFIG = {"backbone": "unet-text", "family": "diffusion", "model": "captions-unet", "dataset": "digits-captions",
          "kind": "image", "image_size": 8, "channels": 1, "levels": 17, "classes": list("0123456789"),
          "num_classes": 10, "vocab": VOCAB, "vocab_size": len(VOCAB) + 3, "start_id": len(VOCAB) + 1,
          "pad_id": len(VOCAB) + 2, "unet": {"channels": [8, 16], "time_dim": 16, "groups": 4},
          "textenc": {"n_layer": 1, "n_head": 2, "n_embd": 16, "context": 24},
          "cross_attention": {"from_level": 1, "heads": 2, "pooled": True},
          "diffusion": {"timesteps": 20, "schedule": "cosine", "p_uncond": 0.1},
          "sample": {"sampler": "ddim", "steps": 4, "eta": 0.0, "guidance": 2.0}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    torch.manual_seed(0)
    net = fam.build_network(CONFIG)
    for p in net.parameters():   # zero-initialised outputs would make every prompt look alike
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.05)
    result = export_model("captions-unet", net.eval(), CONFIG, ExportConfig(), root)
    return root, net, result


def args(**kw):
    base = dict(model="captions-unet", count=3, out=None, label=None, steps=None, guidance=None,
                prompt="a thick slanted seven", length=None, temperature=None, top_k=None, seed=0, exports=None,
                inpaint=None, mask=None, jump=None, resample=None, resize=False)
    return Namespace(**{**base, **kw})


def test_both_graphs_export_and_pass_the_parity_gate(exported):
    root, _, result = exported
    assert result["passed"], result.get("reason")
    assert result["max_abs"] < 1e-4
    names = {c["name"].split(",")[0] for c in result["checks"]}
    assert names == {"text encoder", "denoiser"}
    folder = root / "exports" / "captions-unet"
    config = json.loads((folder / "config.json").read_text())
    assert config["graph"] == "text_denoiser" and config["files"]["text_encoder"] == "text_encoder.onnx"
    assert [i["name"] for i in config["inputs"]] == ["x", "t", "states", "prompt_mask"]
    assert (folder / "text_encoder.onnx").is_file() and config["vocab"] == VOCAB


def test_the_engine_draws_the_images_pytorch_draws(exported):
    root, net, _ = exported
    engine = load_engine(root / "exports" / "captions-unet")
    assert isinstance(engine, TextDiffusionEngine)
    prompts = ["a thick slanted seven", "a thin zero", "wide one"]
    gen = torch.Generator().manual_seed(0)      # the noise PyTorch's sampler draws for the same seed
    got = engine.sample_prompts(prompts, steps=4, eta=0.0, guidance=2.0,
                                randn=lambda shape: torch.randn(shape, generator=gen).numpy())
    want = fam.sample_prompts(net, CONFIG, prompts, steps=4, eta=0.0, guidance=2.0, seed=0)
    unit = fam.model_to_unit(got, 17)
    assert unit.shape == want.shape == (3, 8, 8)
    assert np.abs(unit - want).max() <= 1 / 16 + 1e-6 and (unit == want).mean() > 0.98
    other = engine.sample_prompts(["a thin zero"] * 3, steps=4, seed=0)
    same = engine.sample_prompts(["a thick slanted seven"] * 3, steps=4, seed=0)
    assert not np.allclose(other, same)                       # the prompt steers the images


def test_the_cli_writes_a_grid_for_a_prompt(exported, tmp_path):
    root, _, _ = exported
    out = sample_cli(args(exports=str(root / "exports")), tmp_path)
    assert out == tmp_path / "reports" / "samples" / "captions-unet-local.png" and out.is_file()


@pytest.mark.parametrize("kw, pattern", [
    (dict(prompt=""), r"^prompt: empty; give a caption"),
    (dict(prompt="a THICK seven"), r"^prompt: 5 character\(s\) the text encoder does not know: 'T', 'H'"),
    (dict(prompt="a thick slanted seven, wide and thin"), r"^prompt: 36 characters, longer than the text encoder's "
                                                          r"context of 23; shorten it"),
    (dict(prompt=None), r"^--prompt: captions-unet draws images of a caption; give one"),
    (dict(label=3), r"^--label: captions-unet is a diffusion image model and has no such setting"),
    (dict(steps=500), r"^--steps: 500 sampling steps asked for"),
])
def test_bad_prompts_are_one_line_and_write_nothing(exported, tmp_path, kw, pattern):
    root, _, _ = exported
    with pytest.raises(GenflowError, match=pattern) as e:
        sample_cli(args(exports=str(root / "exports"), **kw), tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "reports").exists()


def test_the_cli_exits_1_with_one_line(exported, tmp_path, capsys):
    from flows.cli import main

    code = main(["sample", "captions-unet", "--prompt", "a thick seven!", "--exports", str(exported[0] / "exports")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("genflow sample: prompt: 1 character(s) the text encoder does not know: '!'")
    assert "\n" not in err


def test_sampling_from_a_prompt_never_imports_torch(exported, tmp_path):
    root, _, _ = exported
    sample_without_torch(tmp_path, model="captions-unet", steps=3, prompt="a thick slanted seven",
                         exports=str(root / "exports"))
    assert (tmp_path / "reports" / "samples" / "captions-unet-local.png").is_file()


def test_serving_plans_and_runs_prompt_requests_as_genflow_sample_draws_them(exported):
    from components.serving.generate import Limits, RequestProblem, plan, png_base64, run_jobs

    root, _, _ = exported
    engine = load_engine(root / "exports" / "captions-unet")
    limits = Limits(max_n=8, max_length=64)
    a = plan(engine, {"prompt": "a thick seven", "n": 2, "seed": 3}, limits)
    b = plan(engine, {"prompt": "a thin zero", "n": 1, "seed": 4}, limits)
    assert a.batch_key == b.batch_key == ("prompted", 4, 2.0)
    together = run_jobs(engine, [a, b])
    for job, images in zip((a, b), together):
        alone = engine.to_levels(engine.sample_prompts(job.settings["prompts"], seed=job.settings["seed"]))
        assert images == [png_base64(x, 17) for x in alone]     # batched = drawn alone, as genflow sample does
    for body, field in (({"prompt": ""}, "prompt"), ({"prompt": "a seven!"}, "prompt"), ({"n": 1}, "prompt"),
                        ({"prompt": "a seven", "label": 3}, "label"), ({"prompt": "a seven", "steps": 99}, "steps")):
        with pytest.raises(RequestProblem) as e:
            plan(engine, body, limits)
        assert e.value.detail[0]["field"] == field, body


def test_the_serving_smoke_check_passes_and_label_or_inpaint_requests_are_refused(exported, tmp_path):
    from components.serving.models import smoke_check

    root, _, _ = exported
    engine = load_engine(root / "exports" / "captions-unet")
    smoke_check(engine)
    with pytest.raises(GenflowError, match=r"^--label: captions-unet draws images of a caption, not of a class"):
        engine.sample([0])
    with pytest.raises(GenflowError, match=r"^--inpaint: captions-unet does not inpaint yet"):
        engine.inpaint(np.zeros((1, 8, 8)), np.zeros((1, 8, 8), bool))
