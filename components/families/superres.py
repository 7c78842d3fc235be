"""Super-resolution by diffusion (SR3-style): a denoiser conditioned on the image at 1/factor size.

    metrics = train("digits-sr", params, root)      # models/digits-sr/model.pt + train_metrics.json
    metrics = evaluate("digits-sr", params, root)   # reports/digits-sr/metrics.json, superres.md, samples.png
    net, config = load_model("digits-sr", root)     # SuperResUNet with EMA weights + its config dict

The low-res image of a training image is its factor x factor block means on the data's levels,
channel by channel for colour images (components/sampling/superres.py); the network
(components/models/srunet.py) upsamples it and reads it beside the noisy image. Training,
schedule, loss and samplers are the image diffusion family's (components/families/diffusion.py,
components/models/diffusion.py), with the low-res batch bound into the network call. No label
conditioning: every call gets the null class (sampling with guidance 0), so an upscaling knows
only the low-res image, like the baselines.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from components.config import ModelConfig, Params
from components.families import base
from components.families.diffusion import (
    DiffusionFamilyError,
    check_data_shape,
    image_shape,
    levels_to_model,
    make_diffusion,
    manifest_channels,
    model_to_unit,
)
from components.files import write_json, write_text
from components.layout import Layout
from components.sampling.superres import SuperResInputError, check_factor, downsample_images
from components.spec import ModelSpec

BACKBONE = "unet-sr"


class SuperResFamilyError(DiffusionFamilyError):
    """A super-resolution model cannot be trained, evaluated or loaded as asked; the message says why."""


# ---------------------------------------------------------------------------
# The Family contract (components/families/base.py)
# ---------------------------------------------------------------------------

def check(key: str, mc: ModelConfig) -> None:
    """Refuse settings this family cannot honour, in one line, before any data is read."""
    if mc.family != "diffusion" or mc.backbone != BACKBONE:
        raise SuperResFamilyError(f"models.{key}.backbone: {mc.backbone!r} is not a super-resolution backbone; "
                                  f"use {BACKBONE}")
    if mc.condition.factor < 2:
        raise SuperResFamilyError(f"models.{key}.condition.factor: must be at least 2 (the low-res image is "
                                  f"image_size / factor pixels a side), got {mc.condition.factor}")
    if mc.sample.guidance != 0.0:
        raise SuperResFamilyError(f"models.{key}.sample.guidance: {mc.sample.guidance} asks for label guidance, "
                                  f"but a {BACKBONE} model is not label-conditioned; set it to 0")


def model_config(key: str, mc: ModelConfig, manifest: dict, root: Optional[Path] = None) -> dict[str, Any]:
    """The model spec saved with the weights (the U-Net's, the process's and the condition's settings)."""
    check(key, mc)
    if manifest.get("kind") != "image":
        raise SuperResFamilyError(f"models.{key}.dataset: {mc.dataset} holds {manifest.get('kind')}, "
                                  "a super-resolution model needs images")
    size = int(manifest["image_size"])
    try:
        check_factor(size, mc.condition.factor, f"models.{key}.condition.factor")
    except SuperResInputError as e:   # one line naming the dataset's size and what to do
        raise SuperResFamilyError(f"{e} (datasets.{mc.dataset}.image_size)") from None
    return ModelSpec(model=key, backbone=mc.backbone, dataset=mc.dataset, kind="image",
                     network=dataclasses.asdict(mc.unet), process=dataclasses.asdict(mc.diffusion),
                     sample=dataclasses.asdict(mc.sample), condition=dataclasses.asdict(mc.condition),
                     image_size=size, channels=manifest_channels(key, mc, manifest, SuperResFamilyError),
                     levels=int(manifest["levels"]),
                     classes=tuple(manifest["classes"])).to_config()


def build_network(config: dict[str, Any]):
    """A freshly initialised SuperResUNet for a model spec."""
    from components.config import ConditionConfig, UNetConfig
    from components.models.srunet import SuperResUNet

    return SuperResUNet(UNetConfig(**config["unet"]), image_size=config["image_size"],
                        in_channels=config["channels"], num_classes=config["num_classes"],
                        condition=ConditionConfig(**config["condition"]))


def training_data(key: str, mc: ModelConfig, config: dict[str, Any], root: Path):
    """(get_batch(step, gen) -> (images (B, C, H, W), low-res images (B, C, H/f, W/f)), both in [-1, 1])."""
    import torch

    from components.data import load_images

    x, _ = load_images(mc.dataset, "train", root)
    levels, factor = config["levels"], config["condition"]["factor"]
    check_data_shape(x, config, mc.dataset, SuperResFamilyError)
    x0 = torch.from_numpy(levels_to_model(x, levels))                                          # (N, C, H, W)
    lowres = torch.from_numpy(levels_to_model(downsample_images(x, factor, levels), levels))   # (N, C, H/f, W/f)
    B = mc.train.batch_size

    def get_batch(step: int, gen: torch.Generator):
        idx = torch.randint(len(x0), (B,), generator=gen)
        return x0[idx], lowres[idx]
    return get_batch, B


def _loss(diffusion, model, x0, lowres, gen):
    """The DDPM loss with the low-res images bound into every network call; labels: the null class."""
    import torch

    null = torch.full((len(x0),), diffusion.null_class, dtype=torch.long, device=x0.device)
    return diffusion.training_loss(lambda x, t, y: model(x, t, y, lowres), x0, null, gen)


def loss_fn(config: dict[str, Any]):
    diffusion = make_diffusion(config)

    def loss(model, batch, gen):
        return _loss(diffusion, model, batch[0], batch[1], gen)
    return loss


def _zeros(config: dict[str, Any], batch: int, device) -> tuple[Any, Any]:
    import torch

    s, c, f = config["image_size"], config["channels"], config["condition"]["factor"]
    return torch.zeros(batch, c, s, s, device=device), torch.zeros(batch, c, s // f, s // f, device=device)


def flops_per_item(net, config: dict[str, Any], batch: int = 2) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dev = base.device_of(net)
    x0, lowres = _zeros(config, batch, dev)
    with FlopCounterMode(display=False) as counter:
        _loss(make_diffusion(config), net, x0, lowres, torch.Generator(device=dev).manual_seed(0)).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def probe_step(net, config: dict[str, Any], batch_size: int, gen):
    """(loss() of a training step on random images of the model's shape, images per step)."""
    import torch

    x0, lowres = _zeros(config, batch_size, gen.device)
    x0 = torch.rand(x0.shape, generator=gen, device=gen.device) * 2 - 1
    lowres = torch.rand(lowres.shape, generator=gen, device=gen.device) * 2 - 1
    diffusion = make_diffusion(config)
    return (lambda: _loss(diffusion, net, x0, lowres, gen)), batch_size


def load_model(key: str, root: Path):
    """(SuperResUNet with the trained EMA weights in eval mode, its model spec) from models/<key>/model.pt."""
    return base.load_model(key, root, SuperResFamilyError, (BACKBONE,))


train = base.train   # the one training entry (components/families/base.py)


# ---------------------------------------------------------------------------
# Upscale and evaluate
# ---------------------------------------------------------------------------

def upscale_images(net, config: dict[str, Any], lowres: np.ndarray, *, sampler: str = "ddim", steps: int = 50,
                   eta: float = 0.0, seed: int = 0, batch_size: int = 512) -> np.ndarray:
    """Low-res levels (N, H/f, W/f) grey or (N, H/f, W/f, C) colour -> upscaled images (N, H, W[, C])
    float32 in [0, 1], on the data's levels."""
    import torch

    diffusion = make_diffusion(config)
    levels, size = config["levels"], config["image_size"]
    cond = torch.from_numpy(levels_to_model(np.asarray(lowres), levels))                # (N, C, h, w)
    labels = torch.zeros(len(cond), dtype=torch.long)   # any valid class: guidance 0 feeds the null class
    diffusion.check_request(labels, steps, 0.0, sampler, eta)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for i in range(0, len(cond), batch_size):
            c = cond[i:i + batch_size]
            x = diffusion.sample(lambda x, t, y: net(x, t, y, c), labels[i:i + batch_size],
                                 (config["channels"], size, size), sampler=sampler, steps=steps, eta=eta,
                                 guidance=0.0, generator=gen)
            out.append(model_to_unit(x.numpy(), levels))
    return np.concatenate(out) if out else np.zeros((0, *image_shape(config)), np.float32)


def comparison_grid(lowres: np.ndarray, bicubic: np.ndarray, upscaled: np.ndarray, originals: np.ndarray,
                    factor: int) -> np.ndarray:
    """Rows: low-res (shown at full size, nearest), bicubic, this model, original; one column per image."""
    big = lowres.repeat(factor, axis=1).repeat(factor, axis=2)
    return np.concatenate([big, bicubic, upscaled, originals])


def evaluate(key: str, params: Params, root: Path) -> dict[str, float]:
    """Upscale the test split's low-res images; score them and the baselines; write reports/<key>/.

    eval/sr_* and baseline/{bicubic,nearest}_* (components/evaluation/superres.py), the shared image
    metrics of the upscalings (eval/fd, eval/class_acc, ...) and images.py's baselines at the same n."""
    from components.data import load_images
    from components.evaluation.images import balanced_pick, image_baselines, save_grid
    from components.evaluation.superres import interpolate, superres_metrics, superres_table
    from components.resources import peak_rss
    from components.training import set_threads

    root = Path(root)
    mc = params.model(key)
    check(key, mc)
    net, config = load_model(key, root)
    set_threads(mc.train.threads)
    s, levels, factor = mc.sample, config["levels"], config["condition"]["factor"]
    x_te, y_te = load_images(config["dataset"], "test", root)
    pick = balanced_pick(y_te, min(mc.eval.num_samples, len(y_te)), seed=0)   # every class, evenly
    originals_levels, labels = x_te[pick], y_te[pick].astype(np.int64)
    lowres_levels = downsample_images(originals_levels, factor, levels)
    originals, lowres = originals_levels / np.float32(levels - 1), lowres_levels / np.float32(levels - 1)

    t0 = time.perf_counter()
    with peak_rss() as mem:
        upscaled = upscale_images(net, config, lowres_levels, sampler=s.sampler, steps=s.steps, eta=s.eta,
                                  seed=mc.train.seed)
    ms = (time.perf_counter() - t0) * 1000 / max(len(pick), 1)
    metrics = superres_metrics(upscaled, lowres, originals, labels, config["dataset"], root, factor, levels)
    metrics.update(image_baselines(config["dataset"], root, n=len(pick), seed=0))   # real: these originals
    metrics.update({"perf/sample_ms_per_item": ms, "perf/peak_rss_sample_mb": mem.peak_mb,
                    "perf/peak_rss_sample_delta_mb": mem.delta_mb})

    out = Layout(root).report_dir(key)
    k = max(1, min(10, len(pick)))                 # the first images, one column each
    grid = comparison_grid(lowres[:k], interpolate(lowres[:k], factor, "bicubic", levels), upscaled[:k],
                           originals[:k], factor)
    save_grid(grid, out / "samples.png", nrow=k)
    title = (f"# {key}: {factor}x super-resolution of {len(pick)} test images "
             f"({s.sampler}-{s.steps}; samples.png rows: low-res, bicubic, {key}, original)")
    from components.evaluation.editing import class_metrics_reason

    reason = class_metrics_reason(config["dataset"], root)
    write_text(out / "superres.md", f"{title}\n\n{superres_table(metrics, *([reason] if reason else []))}")
    write_json(out / "metrics.json", metrics)
    return metrics
