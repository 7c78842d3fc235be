"""Tiny exported and registered models for the serving tests (unit and integration).

    folders = export_tiny(root)                      # {"unet": Path, "gpt": Path, "mdlm": Path, "pixels": Path}
    folder = export_tiny_sr(root)                    # root/exports/tiny-sr: a super-resolution U-Net
    v = register(folders["unet"], "srv-ab12-unet", artifacts)       # version "1", alias champion
    v = register(folders["unet"], key, artifacts, alias=None)      # a version without alias
    v = register(broken_copy(folders["unet"], tmp), key, artifacts) # a version that fails its smoke check

TorchScript graphs (quick to export); every test registers its own model names in the session's
SQLite store, so tests do not see each other's aliases.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Optional

VOCAB = "\n abcdefgh"
UNET_CONFIG = {"backbone": "unet", "family": "diffusion", "image_size": 8, "levels": 17, "num_classes": 3,
               "diffusion": {"timesteps": 20, "schedule": "cosine"},
               "sample": {"sampler": "ddim", "steps": 10, "eta": 0.0, "guidance": 2.0}}
TEXT_CONFIG = {"backbone": "gpt", "family": "transformer", "kind": "text", "vocab": VOCAB,
               "sample": {"temperature": 0.8, "top_k": 0, "length": 12, "prompt": "ab"}}
PIXELS_CONFIG = {"backbone": "gpt", "family": "transformer", "kind": "image", "levels": 5, "num_classes": 3,
                 "image_size": 4}
SR_CONFIG = {"backbone": "unet-sr", "family": "diffusion", "image_size": 8, "levels": 17, "num_classes": 3,
             "diffusion": {"timesteps": 20, "schedule": "cosine"},
             "condition": {"kind": "lowres", "factor": 2, "upsample": "bilinear"},
             "sample": {"sampler": "ddim", "steps": 10, "eta": 0.0, "guidance": 0.0}}
MDLM_CONFIG = {"backbone": "mdlm", "family": "diffusion", "kind": "text", "vocab": VOCAB,
               "mask_id": len(VOCAB) + 1,
               "sample": {"steps": 4, "length": 10, "prompt": "ab", "temperature": 1.0, "top_k": 0}}


def export_tiny(root: Path, seed: int = 0) -> dict[str, Path]:
    """Four tiny exported models under root/exports/: a U-Net, a text GPT, a pixel GPT, a masked LM."""
    import torch

    from components.config import ExportConfig, GPTConfig, UNetConfig
    from components.export import export_model
    from components.models.gpt import GPT
    from components.models.mdlm import MaskedLM
    from components.models.unet import UNet

    torch.manual_seed(seed)
    unet = UNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), image_size=8, in_channels=1, num_classes=3)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.2)
    text = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), len(VOCAB) + 1)
    pixels = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=17), 8)  # 5 levels + 3 class tokens
    mdlm = MaskedLM(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), len(VOCAB) + 2)
    for p in list(text.parameters()) + list(mdlm.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    nets = {"unet": (unet, UNET_CONFIG), "gpt": (text, TEXT_CONFIG), "pixels": (pixels, PIXELS_CONFIG),
            "mdlm": (mdlm, MDLM_CONFIG)}
    out = {}
    for name, (net, cfg) in nets.items():
        assert export_model(f"tiny-{name}", net.eval(), cfg, ExportConfig(), root, exporter="torchscript")["passed"]
        out[name] = root / "exports" / f"tiny-{name}"
    return out


def tiny_sr_net(seed: int = 0):
    """A tiny super-resolution U-Net (8x8 from 4x4) with random weights, in eval mode."""
    import torch

    from components.config import ConditionConfig, UNetConfig
    from components.models.srunet import SuperResUNet

    torch.manual_seed(seed)
    net = SuperResUNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), image_size=8, in_channels=1,
                       num_classes=3, condition=ConditionConfig(**SR_CONFIG["condition"]))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def export_tiny_sr(root: Path, key: str = "tiny-sr", seed: int = 0) -> Path:
    """root/exports/<key>/: the tiny super-resolution U-Net exported with its parity gate."""
    from components.config import ExportConfig
    from components.export import export_model

    assert export_model(key, tiny_sr_net(seed), SR_CONFIG, ExportConfig(), root, exporter="torchscript")["passed"]
    return root / "exports" / key


def broken_copy(folder: Path, dest: Path) -> Path:
    """The exported folder with model.onnx replaced by bytes onnxruntime cannot read."""
    dest = Path(dest) / f"broken-{uuid.uuid4().hex[:6]}"
    shutil.copytree(folder, dest)
    (dest / "model.onnx").write_bytes(b"not an onnx graph")
    return dest


def unique(name: str) -> str:
    return f"srv-{uuid.uuid4().hex[:6]}-{name}"


def register(folder: Path, key: str, artifacts: Path, alias: Optional[str] = "champion",
             tracking_uri: Optional[str] = None) -> str:
    """Register an exported folder (as the run's onnx/ artifacts) as a new version of `key`; returns it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("serving-tests") or client.get_experiment(
        client.create_experiment("serving-tests", artifact_location=Path(artifacts).as_uri()))
    run = client.create_run(exp.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "onnx")
    client.set_terminated(run.info.run_id)
    try:
        client.get_registered_model(key)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(key)
    mv = client.create_model_version(key, f"runs:/{run.info.run_id}/onnx", run_id=run.info.run_id,
                                     tags={"genflow.parity_max_abs": "2e-06", "genflow.parity_ok": "true"})
    if alias:
        client.set_registered_model_alias(key, alias, mv.version)
    return str(mv.version)


SAMPLE_ARGS = dict(model="", count=2, out=None, label=None, steps=None, guidance=None, prompt=None, length=None,
                   temperature=None, top_k=None, seed=0, exports=None, inpaint=None, mask=None, jump=None,
                   resample=None, resize=False, upscale=None)


def sample_without_torch(root: Path, imports: tuple[str, ...] = (), **settings) -> str:
    """Run `genflow sample`'s handler (flows.sample.sample_cli) with `settings` over SAMPLE_ARGS in a
    fresh interpreter, project `root`; fails unless it succeeds without importing torch (after
    `imports` too, e.g. the modules the command reaches). Returns its stdout."""
    import subprocess
    import sys

    args = {**SAMPLE_ARGS, **settings}
    code = "\n".join(["import sys", "from argparse import Namespace", "from pathlib import Path",
                      "from flows.sample import sample_cli", *(f"import {m}" for m in imports),
                      f"print(sample_cli(Namespace(**{args!r}), Path({str(root)!r})))",
                      "assert 'torch' not in sys.modules, 'torch was imported'", "print('NO TORCH')"])
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NO TORCH" in out.stdout
    return out.stdout
