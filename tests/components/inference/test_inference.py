"""Torch-free sampling on onnxruntime: same results as the PyTorch process, the CLI, the registry, bad input."""
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import ExportConfig, GPTConfig, UNetConfig
from components.errors import GenflowError, RegistryError
from components.export import export_model
from components.inference import InferenceError, load_engine, make_session, session_options
from components.models.diffusion import GaussianDiffusion
from components.models.gpt import GPT
from components.models.unet import UNet
from components.sampling.requests import SamplingRequestError
from flows.sample import sample_cli
from serving_models import PIXELS_CONFIG as DIGITS_CONFIG  # noqa: E402  (the tiny models' configs, shared)
from serving_models import TEXT_CONFIG, UNET_CONFIG, VOCAB  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A project root with three tiny exported models (TorchScript graphs: quick to export)."""
    root = tmp_path_factory.mktemp("root")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), image_size=8, in_channels=1, num_classes=3)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.2)
    text = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16), len(VOCAB) + 1)
    digits = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=17), 8)  # 5 levels + 3 class tokens
    nets = {"digits-unet": unet.eval(), "pydoc-gpt": text.eval(), "digits-gpt": digits.eval()}
    for key, cfg in (("digits-unet", UNET_CONFIG), ("pydoc-gpt", TEXT_CONFIG), ("digits-gpt", DIGITS_CONFIG)):
        assert export_model(key, nets[key], cfg, ExportConfig(), root, exporter="torchscript")["passed"]
    return root, nets


def args(**kw) -> Namespace:
    base = dict(model=None, count=None, out=None, label=None, steps=None, guidance=None, prompt=None, length=None,
                temperature=None, top_k=None, seed=0, exports=None)
    return Namespace(**{**base, **kw})


# ---------------------------------------------------------------------------
# Same numbers as PyTorch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, steps, eta, guidance", [
    ("ddim", 7, 0.0, 2.0), ("ddpm", 20, 0.0, 2.0), ("ddim", 5, 1.0, 0.0), ("ddpm", 6, 0.0, 1.0)])
def test_sampling_matches_the_pytorch_diffusion_process_draw_for_draw(exported, sampler, steps, eta, guidance):
    root, nets = exported
    engine = load_engine(root / "exports" / "digits-unet", threads=1)
    y = torch.tensor([0, 1, 2, 1])
    process = GaussianDiffusion(timesteps=20, schedule="cosine", num_classes=3)
    ref = process.sample(nets["digits-unet"], y, (1, 8, 8), sampler=sampler, steps=steps, eta=eta,
                         guidance=guidance, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the same draws, in the same order (x_T, then each step's noise)
    ours = engine.sample(y.numpy(), sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                         randn=lambda shape: torch.randn(shape, generator=gen).numpy())
    assert ours.shape == (4, 1, 8, 8) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)


def test_text_generation_matches_pytorch_greedy_decoding_past_the_context(exported):
    root, nets = exported
    engine = load_engine(root / "exports" / "pydoc-gpt", threads=1)
    prompt = np.array([[1, 2, 3, 4]] * 2)
    ours = engine.generate(prompt, 40, top_k=1)  # 44 tokens: the cache slides twice (block_size 16)
    theirs = nets["pydoc-gpt"].generate(torch.from_numpy(prompt), 40, top_k=1)
    assert np.array_equal(ours, theirs.numpy())


@pytest.fixture(scope="module")
def peaked_gpt(tmp_path_factory):
    """An exported GPT with large weights (its next token depends on the context) and a short context."""
    root = tmp_path_factory.mktemp("peaked")
    torch.manual_seed(1)
    net = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8), len(VOCAB) + 1).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.25 * torch.randn_like(p))
    assert export_model("pydoc-gpt", net, TEXT_CONFIG, ExportConfig(), root, exporter="torchscript")["passed"]
    return load_engine(root / "exports" / "pydoc-gpt", threads=1), net


def test_generation_with_and_without_the_cache_slides_its_window_like_pytorch(peaked_gpt):
    engine, net = peaked_gpt
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    for use_cache in (True, False):  # 33 tokens, context 8: cached re-encodes 6; uncached re-runs the last 8
        ours = engine.generate(prompt, 30, top_k=1, use_cache=use_cache)
        theirs = net.generate(torch.from_numpy(prompt), 30, top_k=1, use_cache=use_cache)
        assert np.array_equal(ours, theirs.numpy()), use_cache
    assert not np.array_equal(engine.generate(prompt, 30, top_k=1),
                              engine.generate(prompt, 30, top_k=1, use_cache=False))  # two different windows
    # inside the context both ways see the same tokens: the same draws
    cached = engine.generate(prompt, 5, seed=3)
    assert np.array_equal(cached, engine.generate(prompt, 5, seed=3, use_cache=False))
    assert len(set(cached[:, 3:].ravel().tolist())) > 2  # really sampled


def test_seeds_make_samples_reproducible(exported):
    root, _ = exported
    engine = load_engine(root / "exports" / "digits-gpt")
    a, b = engine.sample_digits([0, 1, 2], seed=1), engine.sample_digits([0, 1, 2], seed=1)
    assert a.shape == (3, 1, 4, 4) and a.max() < 5 and np.array_equal(a, b)
    assert not np.array_equal(a, engine.sample_digits([0, 1, 2], seed=2))
    text = load_engine(root / "exports" / "pydoc-gpt")
    assert text.sample_text(count=2, seed=4) == text.sample_text(count=2, seed=4)
    assert all(s.startswith("ab") and len(s) == 2 + 12 for s in text.sample_text(count=2))  # params' defaults


def test_session_options_and_provider():
    so = session_options(threads=3)
    assert so.intra_op_num_threads == 3 and so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_cuda_listed_but_unusable_falls_back_to_cpu(exported, monkeypatch):
    import onnxruntime

    root, _ = exported
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _, provider = make_session(root / "exports" / "digits-unet" / "model.onnx")
    assert provider == "CPUExecutionProvider"


# ---------------------------------------------------------------------------
# genflow sample, without torch
# ---------------------------------------------------------------------------

def run_without_torch(code: str, root: Path, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter and fail if it imported torch."""
    prog = ("import sys\n" + code + "\nassert 'torch' not in sys.modules, 'torch was imported'\nprint('NO TORCH')\n")
    out = subprocess.run([sys.executable, "-c", prog], cwd=Path(__file__).resolve().parents[3],
                         env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NO TORCH" in out.stdout
    return out.stdout


def test_the_sampling_modules_import_no_torch(tmp_path):
    run_without_torch("import components.inference, components.sampling.diffusion, components.sampling.masked",
                      tmp_path)
    run_without_torch("import flows.sample", tmp_path)  # the module `genflow sample` runs


def test_sampling_from_local_exports_never_imports_torch(exported):
    root, _ = exported
    code = f"""
from argparse import Namespace
from pathlib import Path
from flows.sample import sample_cli
root = Path({str(root)!r})
base = dict(count=None, out=None, label=None, steps=None, guidance=None, prompt=None, length=None,
            temperature=None, top_k=None, seed=0, exports=str(root / "exports"))
print(sample_cli(Namespace(**{{**base, "model": "digits-unet", "count": 2, "steps": 4}}), root))
print(sample_cli(Namespace(**{{**base, "model": "digits-gpt", "label": 1, "count": 3}}), root))
print(sample_cli(Namespace(**{{**base, "model": "pydoc-gpt", "prompt": "ha", "length": 5, "count": 2}}), root))
"""
    out = run_without_torch(code, root)
    assert "onnxruntime on CPUExecutionProvider" in out
    from PIL import Image

    samples = root / "reports" / "samples"
    grid = Image.open(samples / "digits-unet-local.png")
    assert grid.size == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2)  # one row per class, 2 images each, 4x pixels
    assert Image.open(samples / "digits-gpt-local.png").size == (3 * (16 + 2) + 2, 16 + 4)
    text = (samples / "pydoc-gpt-local.txt").read_text()
    assert text.count("=== sample") == 2 and "\nha" in text


def register(folder: Path, key: str, layout: str, artifacts: Path) -> str:
    """Register an exported folder as a version of `key` with mlflow directly, alias champion; returns the version."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("inference-tests") or client.get_experiment(
        client.create_experiment("inference-tests", artifact_location=artifacts.as_uri()))
    run = client.create_run(exp.experiment_id)
    if layout == "onnx":  # the whole exported folder as the run's onnx/ artifacts
        client.log_artifacts(run.info.run_id, str(folder), "onnx")
        source = f"runs:/{run.info.run_id}/onnx"
    else:  # the registry's own layout: the graph in a model folder, config.json under extras/
        client.log_artifact(run.info.run_id, str(folder / "model.onnx"), "model")
        client.log_artifact(run.info.run_id, str(folder / "config.json"), "extras")
        source = f"runs:/{run.info.run_id}/model"
    client.set_terminated(run.info.run_id)
    try:
        client.get_registered_model(key)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(key)
    mv = client.create_model_version(key, source, run_id=run.info.run_id)
    client.set_registered_model_alias(key, "champion", mv.version)
    return str(mv.version)


def test_sampling_registered_versions_downloads_them_and_never_imports_torch(exported, tmp_path, session_tmp):
    root, _ = exported
    # both layouts: the run's onnx/ folder, and the registry's model + extras/config.json
    artifacts = session_tmp / "inference-artifacts"  # not MLflow's default ./mlruns in the working directory
    version = register(root / "exports" / "digits-unet", "reg-unet-onnx", "onnx", artifacts)
    register(root / "exports" / "digits-unet", "reg-unet-extras", "extras", artifacts)
    project = tmp_path / "project"
    code = f"""
from argparse import Namespace
from pathlib import Path
from flows.sample import sample_cli
base = dict(count=1, out=None, label=2, steps=3, guidance=None, prompt=None, length=None,
            temperature=None, top_k=None, seed=0, exports=None)
for spec in ("reg-unet-onnx", "reg-unet-onnx:{version}", "reg-unet-extras@champion"):
    print(sample_cli(Namespace(**{{**base, "model": spec}}), Path({str(project)!r})))
assert 'mlflow.pytorch' not in sys.modules
"""
    run_without_torch(code, project)
    written = sorted(p.name for p in (project / "reports" / "samples").iterdir())
    assert written == sorted(["reg-unet-onnx-champion.png", f"reg-unet-onnx-{version}.png",
                              "reg-unet-extras-champion.png"])


def test_unknown_alias_version_or_model_in_the_registry_is_one_line(exported, tmp_path, session_tmp):
    root, _ = exported
    key = "reg-unet-errors"
    register(root / "exports" / "digits-unet", key, "onnx", session_tmp / "inference-artifacts")
    cases = [(f"{key}@best", rf"^{key}@best: no such alias; {key} has aliases: champion \(version 1\)$"),
             (f"{key}:7", rf"^{key}:7: no such version in the MLflow registry; {key} has versions: 1$"),
             ("no-such-model", r"^model 'no-such-model': not in the MLflow registry at sqlite:///.*; registered: "),
             ("bad@@spec", r"^model 'bad@@spec': expected MODEL, MODEL@alias or MODEL:version")]
    for spec, pattern in cases:
        with pytest.raises(RegistryError if spec != "bad@@spec" else GenflowError, match=pattern):
            sample_cli(args(model=spec), tmp_path)
    assert not (tmp_path / "reports").exists()


# ---------------------------------------------------------------------------
# Bad input: one line, nothing written
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw, pattern", [
    (dict(model="digits-unet", label=3), r"^--label: digits-unet knows classes 0\.\.2, got 3$"),
    (dict(model="digits-gpt", label=-1), r"^--label: digits-gpt knows classes 0\.\.2, got -1$"),
    (dict(model="digits-unet", count=0), r"^--count: must be at least 1, got 0$"),
    (dict(model="pydoc-gpt", count=-2), r"^--count: must be at least 1, got -2$"),
    (dict(model="digits-unet", steps=21), r"^--steps: 21 sampling steps asked for, .* use 1\.\.20$"),
    (dict(model="digits-unet", guidance=-1.0), r"^--guidance: must be >= 0"),
    (dict(model="nope"), r"exports/nope: no exported model 'nope'; found: digits-gpt, digits-unet, pydoc-gpt$"),
    (dict(model="pydoc-gpt", temperature=0.0), r"^--temperature: must be > 0"),
    (dict(model="digits-gpt", temperature=-1.0), r"^--temperature: must be > 0"),
    (dict(model="pydoc-gpt", top_k=12), r"^--top-k: must be between 0 \(off\) and the vocabulary size 11, got 12$"),
    (dict(model="digits-gpt", top_k=6), r"^--top-k: must be between 0 \(off\) and the 5 grey levels, got 6$"),
    (dict(model="pydoc-gpt", prompt="xyz"), r"^--prompt: .*outside the model's vocabulary: 'x', 'y', 'z'"),
    (dict(model="pydoc-gpt", prompt="a" * 17), r"^--prompt: 17 tokens, longer than the model's context"),
    (dict(model="pydoc-gpt", length=0), r"^--length: must be at least 1, got 0$"),
    (dict(model="pydoc-gpt", label=1), r"^--label: pydoc-gpt is a transformer text model"),
    (dict(model="digits-unet", prompt="ab"), r"^--prompt: digits-unet is a diffusion image model"),
    (dict(model="digits-unet", out="grid.txt"), r"grid.txt: digits-unet makes images; give a .png path$"),
])
def test_bad_requests_raise_one_line_and_write_nothing(exported, tmp_path, kw, pattern):
    root, _ = exported
    out = tmp_path / "out"
    kw.setdefault("out", str(out / ("x.png" if "unet" in kw["model"] or "digits" in kw["model"] else "x.txt")))
    with pytest.raises(GenflowError, match=pattern) as e:
        sample_cli(args(exports=str(root / "exports"), **kw), tmp_path)
    assert "\n" not in str(e.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_missing_or_corrupt_files_are_one_line(exported, tmp_path):
    root, _ = exported
    folder = tmp_path / "exports" / "digits-unet"
    shutil.copytree(root / "exports" / "digits-unet", folder)
    (folder / "model.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(InferenceError, match=r"model.onnx: not a usable ONNX model \(.*\); export it again$"):
        sample_cli(args(model="digits-unet", exports=str(tmp_path / "exports")), tmp_path)
    (folder / "model.onnx").unlink()
    with pytest.raises(InferenceError, match=r"model.onnx: missing; export the model again"):
        load_engine(folder)
    (folder / "config.json").write_text("{ half a file")
    with pytest.raises(InferenceError, match=r"config.json: not valid JSON"):
        load_engine(folder)
    assert not (tmp_path / "reports").exists()


def test_the_cli_prints_one_line_and_exits_1(exported, capsys):
    from flows.cli import main

    root, _ = exported
    assert main(["sample", "digits-unet", "--label", "9", "--exports", str(root / "exports")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "genflow sample: --label: digits-unet knows classes 0..2, got 9"


# ---------------------------------------------------------------------------
# Masked diffusion language model: K parallel steps on onnxruntime
# ---------------------------------------------------------------------------

MDLM_VOCAB = "\n abcdefgh"
MDLM_CONFIG = {"backbone": "mdlm", "family": "diffusion", "kind": "text", "vocab": MDLM_VOCAB,
               "mask_id": len(MDLM_VOCAB) + 1,
               "sample": {"steps": 4, "length": 10, "prompt": "ab", "temperature": 1.0, "top_k": 0}}


@pytest.fixture(scope="module")
def exported_mdlm(tmp_path_factory):
    from components.models.mdlm import MaskedLM

    root = tmp_path_factory.mktemp("mdlm-root")
    torch.manual_seed(0)
    net = MaskedLM(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16), len(MDLM_VOCAB) + 2)  # + unk, [MASK]
    for p in net.parameters():  # peaked distributions, so that draws depend on the weights
        torch.nn.init.normal_(p, std=0.3)
    assert export_model("pydoc-mdlm", net.eval(), MDLM_CONFIG, ExportConfig(), root, exporter="torchscript")["passed"]
    return root, net


@pytest.mark.parametrize("steps, temperature, top_k", [(4, 1.0, 0), (14, 0.7, 3), (1, 1.0, 0), (30, 1.0, 0)])
def test_masked_sampling_matches_the_pytorch_process_draw_for_draw(exported_mdlm, steps, temperature, top_k):
    from components.models.mdlm import MaskedDiffusion

    root, net = exported_mdlm
    engine = load_engine(root / "exports" / "pydoc-mdlm", threads=1)
    prompt = np.array([3, 4])
    gen = torch.Generator().manual_seed(5)
    ref = MaskedDiffusion(engine.mask_id).sample(net, 3, 14, steps, prompt=torch.from_numpy(prompt),
                                                 temperature=temperature, top_k=top_k, generator=gen)
    gen = torch.Generator().manual_seed(5)  # the same uniforms, in the same order
    ours = engine.generate(prompt, 3, 14, steps, temperature, top_k,
                           rand=lambda shape: torch.rand(shape, generator=gen, dtype=torch.float64).numpy())
    assert ours.shape == (3, 16) and np.array_equal(ours, ref.numpy())
    assert not (ours == engine.mask_id).any() and (ours[:, :2] == prompt).all()


class CountingSession:
    """An onnxruntime session that records the input_ids of every call."""

    def __init__(self, session):
        self.session, self.seen = session, []

    def run(self, names, feeds):
        self.seen.append(feeds["input_ids"].copy())
        return self.session.run(names, feeds)


def test_masked_sampling_with_k_equal_to_the_length_or_one_fills_every_position(exported_mdlm):
    root, _ = exported_mdlm
    engine = load_engine(root / "exports" / "pydoc-mdlm", threads=1)
    for steps in (16, 1):
        engine.session = counting = CountingSession(load_engine(root / "exports" / "pydoc-mdlm").session)
        out = engine.generate(np.zeros(0, dtype=np.int64), 2, 16, steps, seed=1)
        assert out.shape == (2, 16) and not (out == engine.mask_id).any()
        assert len(counting.seen) == steps                       # K network calls
        masked = [int((ids[0] == engine.mask_id).sum()) for ids in counting.seen]
        assert masked == list(range(16, 16 - steps, -1))         # K = 16: one position per step; K = 1: all at once
    texts = engine.sample_text(count=2, seed=4)
    assert texts == engine.sample_text(count=2, seed=4) and texts != engine.sample_text(count=2, seed=5)
    assert all(t.startswith("ab") and len(t) == 2 + 10 for t in texts)     # the params' defaults


def test_masked_sampling_from_local_exports_never_imports_torch(exported_mdlm):
    root, _ = exported_mdlm
    code = f"""
from argparse import Namespace
from pathlib import Path
from flows.sample import sample_cli
root = Path({str(root)!r})
base = dict(count=2, out=None, label=None, steps=3, guidance=None, prompt="ha", length=8,
            temperature=None, top_k=None, seed=0, exports=str(root / "exports"), model="pydoc-mdlm")
print(sample_cli(Namespace(**base), root))
"""
    out = run_without_torch(code, root)
    assert "onnxruntime on CPUExecutionProvider" in out
    text = (root / "reports" / "samples" / "pydoc-mdlm-local.txt").read_text()
    assert text.count("=== sample") == 2 and "\nha" in text


@pytest.mark.parametrize("kw, pattern", [
    (dict(steps=0), r"^--steps: must be at least 1, got 0$"),
    (dict(length=15), r"^--length: the prompt \(2\) plus 15 tokens exceed the model's block_size=16"),
    (dict(temperature=0.0), r"^--temperature: must be > 0"),
    (dict(top_k=12), r"^--top-k: must be between 0 \(off\) and the vocabulary size 11, got 12$"),
    (dict(label=1), r"^--label: pydoc-mdlm is a diffusion text model"),
    (dict(guidance=2.0), r"^--guidance: pydoc-mdlm is a diffusion text model"),
    (dict(prompt="xyz"), r"^--prompt: .*outside the model's vocabulary"),
])
def test_bad_masked_sampling_requests_raise_one_line_and_write_nothing(exported_mdlm, tmp_path, kw, pattern):
    root, _ = exported_mdlm
    out = tmp_path / "out" / "x.txt"
    with pytest.raises(GenflowError, match=pattern) as e:
        sample_cli(args(model="pydoc-mdlm", exports=str(root / "exports"), out=str(out), **kw), tmp_path)
    assert "\n" not in str(e.value) and not out.exists()


def test_masked_engine_refuses_k_below_one_before_any_network_call(exported_mdlm):
    root, _ = exported_mdlm
    engine = load_engine(root / "exports" / "pydoc-mdlm", threads=1)
    engine.session = None  # any network call would fail with an AttributeError
    for steps in (0, -2):
        with pytest.raises(SamplingRequestError,
                           match=r"^--steps: K, the number of denoising steps, must be an integer >= 1"):
            engine.generate(np.array([1]), 1, 4, steps)
