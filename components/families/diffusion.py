"""The diffusion family over images: train, evaluate and load a denoiser (U-Net, or DiT by name).

    metrics = train("digits-unet", params, root)      # models/digits-unet/model.pt + train_metrics.json
    metrics = evaluate("digits-unet", params, root)   # reports/digits-unet/metrics.json, samples.png, sampling.*
    net, config = load_model("digits-unet", root)     # network with EMA weights + its config dict

Images are the prepared dataset's levels scaled to [-1, 1]: one channel for grey images (N, H, W),
C for colour images (N, H, W, C) (the manifest's "channels"; the network reads (N, C, H, W)). The network is
picked by ``backbone`` from the registry (components/families/base.py); every backbone is a
module ``Net(cfg, image_size=, in_channels=, num_classes=)`` with the call ``(x, t, y) -> eps``, so the process in
components.models.diffusion trains and samples any of them the same way.
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from components.config import ModelConfig, Params
from components.errors import ModelError
from components.families import base
from components.files import write_json, write_text
from components.layout import Layout
from components.spec import ModelSpec


def image_backbones() -> dict[str, base.Backbone]:
    """The registry's backbones this module trains (components.families.base.BACKBONES, module "diffusion")."""
    return {name: b for name, b in base.BACKBONES.items() if b.module == "diffusion"}


class DiffusionFamilyError(ModelError):
    """A diffusion model cannot be trained, evaluated or loaded as asked; the message says why."""


# ---------------------------------------------------------------------------
# The Family contract (components/families/base.py): spec, network, batches, loss, cost
# ---------------------------------------------------------------------------

def check(key: str, mc: ModelConfig) -> None:
    """Refuse a model this family cannot train, in one line, before any data is read."""
    known = image_backbones()
    if mc.family != "diffusion" or mc.backbone not in known:
        raise DiffusionFamilyError(f"models.{key}.backbone: {mc.backbone!r} is not an image diffusion backbone; "
                                   f"known: {', '.join(known)}")


def model_config(key: str, mc: ModelConfig, manifest: dict, root: Optional[Path] = None) -> dict[str, Any]:
    """The model spec saved with the weights: plain JSON, all that is needed to rebuild them."""
    check(key, mc)
    if manifest.get("kind") != "image":
        raise DiffusionFamilyError(f"models.{key}.dataset: {mc.dataset} holds {manifest.get('kind')}, "
                                   "an image diffusion model needs images")
    section = base.BACKBONES[mc.backbone].section
    return ModelSpec(model=key, backbone=mc.backbone, dataset=mc.dataset, kind="image",
                     network=dataclasses.asdict(getattr(mc, section)), process=dataclasses.asdict(mc.diffusion),
                     sample=dataclasses.asdict(mc.sample), image_size=int(manifest["image_size"]),
                     channels=manifest_channels(key, mc, manifest, DiffusionFamilyError),
                     levels=int(manifest["levels"]), classes=tuple(manifest["classes"])).to_config()


def manifest_channels(key: str, mc: ModelConfig, manifest: dict, error: type[Exception]) -> int:
    """The dataset's channel count (components.data.manifest_channels: 1 grey, 3 colour; absent: 1);
    `error` in one line for any other."""
    from components.data import manifest_channels as channels_of

    channels = channels_of(manifest)
    if channels not in (1, 3):
        raise error(f"models.{key}.dataset: {mc.dataset}'s manifest says channels={channels!r}; image models take "
                    "1 (grey) or 3 (colour) channels; prepare the dataset again")
    return int(channels)


def build_network(config: dict[str, Any]):
    """A freshly initialised network for a model spec (from model_config or a model.pt)."""
    entry = base.backbone(config["backbone"], "config.backbone")
    net_cls = entry.network_class_object()
    net_cfg = base.shape_config_class(entry)(**config[entry.section])
    return net_cls(net_cfg, image_size=config["image_size"], in_channels=config["channels"],
                   num_classes=config["num_classes"])


def make_diffusion(config: dict[str, Any]):
    from components.models.diffusion import GaussianDiffusion
    d = config["diffusion"]
    return GaussianDiffusion(d["timesteps"], d["schedule"], config["num_classes"], d["p_uncond"])


def levels_to_model(x: np.ndarray, levels: int) -> np.ndarray:
    """uint8 levels (N, H, W) grey or (N, H, W, C) colour -> float32 (N, C, H, W) in [-1, 1] (C = 1 for grey)."""
    if np.ndim(x) == 4:   # colour, channels last -> the network's channels first
        x = np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))
        return x.astype(np.float32) / (levels - 1) * 2 - 1
    return (x.astype(np.float32) / (levels - 1) * 2 - 1)[:, None]


def model_to_unit(x: np.ndarray, levels: int) -> np.ndarray:
    """Network output (N, C, H, W) in [-1, 1] -> (N, H, W) for C == 1, else (N, H, W, C), in [0, 1]
    and rounded to the data's levels (per channel)."""
    unit = np.clip((x[:, 0] + 1) / 2, 0.0, 1.0) if x.shape[1] == 1 else \
        np.clip((np.moveaxis(x, 1, -1) + 1) / 2, 0.0, 1.0)
    return (np.round(unit * (levels - 1)) / (levels - 1)).astype(np.float32)


def image_shape(config: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one image as the model's outputs hold it: (H, W) grey, (H, W, C) colour."""
    s, c = config["image_size"], config.get("channels", 1)
    return (s, s) if c == 1 else (s, s, c)


def training_data(key: str, mc: ModelConfig, config: dict[str, Any], root: Path):
    """(get_batch(step, gen) -> (images (B, C, H, W) in [-1, 1], labels (B,)), images per batch)."""
    import torch

    from components.data import load_images

    x, y = load_images(mc.dataset, "train", root)
    check_data_shape(x, config, mc.dataset, DiffusionFamilyError)
    x0 = torch.from_numpy(levels_to_model(x, config["levels"]))              # (N, C, H, W) in [-1, 1]
    labels = torch.from_numpy(y.astype(np.int64))                            # (N,)
    B = mc.train.batch_size

    def get_batch(step: int, gen: torch.Generator):
        idx = torch.randint(len(x0), (B,), generator=gen)
        return x0[idx], labels[idx]
    return get_batch, B


def check_data_shape(x: np.ndarray, config: dict[str, Any], dataset: str, error: type[Exception]) -> None:
    """Refuse prepared images whose shape is not the model spec's (N, H, W) or (N, H, W, C), in one line."""
    want = image_shape(config)
    if tuple(x.shape[1:]) != want:
        raise error(f"data/prepared/{dataset}: images of shape {tuple(x.shape[1:])}, the model spec says {want} "
                    f"(image_size {config['image_size']}, channels {config.get('channels', 1)}); prepare the "
                    "dataset again")


def loss_fn(config: dict[str, Any]):
    """The DDPM loss: noise-prediction MSE at a random timestep, labels dropped at p_uncond."""
    diffusion = make_diffusion(config)

    def loss(model, batch, gen):
        return diffusion.training_loss(model, batch[0], batch[1], gen)
    return loss


def flops_per_item(net, config: dict[str, Any], batch: int = 2) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    diffusion = make_diffusion(config)
    s, c = config["image_size"], config["channels"]
    dev = base.device_of(net)
    x0 = torch.zeros(batch, c, s, s, device=dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    with FlopCounterMode(display=False) as counter:
        diffusion.training_loss(net, x0, y, torch.Generator(device=dev).manual_seed(0)).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def probe_step(net, config: dict[str, Any], batch_size: int, gen):
    """(loss() of a training step on random images of the model's shape, images per step)."""
    import torch

    diffusion = make_diffusion(config)
    s, c = config["image_size"], config.get("channels", 1)
    dev = gen.device                                                           # the model's (probe_train_step)
    x0 = torch.rand(batch_size, c, s, s, generator=gen, device=dev) * 2 - 1    # (B, C, H, W) in [-1, 1]
    y = torch.randint(config["num_classes"], (batch_size,), generator=gen, device=dev)     # (B,)
    return (lambda: diffusion.training_loss(net, x0, y, gen)), batch_size


def load_model(key: str, root: Path):
    """(network with the trained EMA weights in eval mode, its model spec) from models/<key>/model.pt."""
    return base.load_model(key, root, DiffusionFamilyError, tuple(image_backbones()))


train = base.train   # the one training entry (components/families/base.py)


# ---------------------------------------------------------------------------
# Sample and evaluate
# ---------------------------------------------------------------------------

def parse_sampler(name: str, config: dict[str, Any]) -> tuple[str, int]:
    """'ddpm' -> ('ddpm', T); 'ddim20' -> ('ddim', 20); 'ddim' -> ('ddim', sample.steps)."""
    m = re.fullmatch(r"(ddpm|ddim)(\d*)", name)
    if not m:
        raise DiffusionFamilyError(f"eval.sampler_sweep: {name!r} is not a sampler; use ddpm, ddpmN, ddim or ddimN "
                                   "(e.g. ddim20)")
    T = config["diffusion"]["timesteps"]
    steps = int(m.group(2)) if m.group(2) else (T if m.group(1) == "ddpm" else config["sample"]["steps"])
    if not 1 <= steps <= T:
        raise DiffusionFamilyError(f"eval.sampler_sweep: {name} asks for {steps} steps, but the model was trained "
                                   f"with diffusion.timesteps={T}; use at most {T}")
    return m.group(1), steps


def sample_images(net, config: dict[str, Any], labels: np.ndarray, *, sampler: str = "ddim", steps: int = 50,
                  eta: float = 0.0, guidance: float = 1.0, seed: int = 0, batch_size: int = 512) -> np.ndarray:
    """Class-conditional samples (N, H, W) grey or (N, H, W, C) colour, float32 in [0, 1] on the data's levels."""
    import torch

    diffusion = make_diffusion(config)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    diffusion.check_request(labels, steps, guidance, sampler, eta)  # fail before any work
    gen = torch.Generator().manual_seed(seed)
    shape = (config["channels"], config["image_size"], config["image_size"])
    out = []
    with torch.inference_mode():
        for i in range(0, len(labels), batch_size):
            x = diffusion.sample(net, labels[i:i + batch_size], shape, sampler=sampler, steps=steps,
                                 eta=eta, guidance=guidance, generator=gen)
            out.append(model_to_unit(x.numpy(), config["levels"]))
    return np.concatenate(out) if out else np.zeros((0, *image_shape(config)), np.float32)


LABEL_TIMESTEPS = 5   # timesteps (x 2 noise draws) the diffusion classifier of inpaint_images averages over


def inpaint_images(net, config: dict[str, Any], levels: np.ndarray, keep: np.ndarray, *, sampler: str = "ddim",
                   steps: int = 50, eta: float = 0.0, guidance: float = 1.0, jump_length: int = 1,
                   jump_n_sample: int = 1, infer_label: bool = False, label_completions: int = 3,
                   seed: int = 0, batch_size: int = 512) -> np.ndarray:
    """RePaint completions of levels (N, H, W) grey or (N, H, W, C) colour where keep (N, H, W) is False
    (a pixel's every channel: the mask is per pixel); the same shape, float32 in [0, 1] on the data's
    levels (the components/evaluation/editing.py `complete`).

    Unconditional (the null class), or with infer_label: the model picks each image's class itself,
    as a pixel GPT does from its likelihood: the class whose noise predictions fit the kept pixels
    best (GaussianDiffusion.class_scores), summed over `label_completions` unconditional
    completions (the fill a single one draws sways the scores), then a completion of that class
    with `guidance`. The true label is never used.
    """
    import torch

    diffusion = make_diffusion(config)
    known = torch.from_numpy(levels_to_model(levels, config["levels"]))             # (N, C, H, W) in [-1, 1]
    keep_t = torch.from_numpy(np.asarray(keep, dtype=bool)[:, None].copy())          # (N, 1, H, W)
    if known.shape[1] > 1:                                                            # every channel of a pixel
        keep_t = keep_t.expand(-1, known.shape[1], -1, -1).contiguous()
    gen = torch.Generator().manual_seed(seed)
    T = config["diffusion"]["timesteps"]
    probe = [int(t) for t in np.linspace(T * 0.05, T * 0.9, LABEL_TIMESTEPS)]
    kw = dict(sampler=sampler, steps=steps, eta=eta, jump_length=jump_length, jump_n_sample=jump_n_sample,
              generator=gen)
    out = []
    with torch.inference_mode():
        for i in range(0, len(known), batch_size):
            k, m = known[i:i + batch_size], keep_t[i:i + batch_size]
            if infer_label:
                weight = m.float()
                scores = sum(diffusion.class_scores(net, diffusion.inpaint(net, k, m, **kw), weight, probe,
                                                    generator=gen) for _ in range(label_completions))
                x = diffusion.inpaint(net, k, m, scores.argmin(1), guidance=guidance, **kw)
            else:
                x = diffusion.inpaint(net, k, m, **kw)
            out.append(model_to_unit(x.numpy(), config["levels"]))
    return np.concatenate(out)


def class_rows(samples: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 10) -> np.ndarray:
    """Reorder samples so that row c of a grid with `per_row` columns holds class c (up to 10 classes)."""
    rows = []
    for c in range(min(num_classes, 10)):
        picked = samples[labels == c][:per_row]
        pad = np.zeros((per_row - len(picked), *samples.shape[1:]), samples.dtype)  # blank cells if too few
        rows.append(np.concatenate([picked, pad]))
    return np.concatenate(rows)


def sampling_table(rows: list[dict[str, Any]], baselines: dict[str, float],
                   not_applicable: Optional[dict[str, str]] = None) -> str:
    """Markdown speed/quality table of the sampler sweep, with the real-data floor and baselines; a line
    per metric the data cannot have (images.py's not_applicable: class_acc of unlabelled data) saying why."""
    from components.evaluation.images import METRICS

    cols = [c for c in METRICS if all(c in r for r in rows)]
    lines = ["| sampler | steps | ms/image | " + " | ".join(cols) + " |",
             "|---|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['steps']} | {r['ms_per_item']:.2f} | "
                     + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    for b in ("real", "kde", "gaussian"):
        if f"baseline/{b}_fd" in baselines:
            lines.append(f"| {b} (baseline) | | | "
                         + " | ".join(f"{baselines.get(f'baseline/{b}_{c}', float('nan')):.4f}" for c in cols) + " |")
    if not_applicable:
        lines += [""] + [f"{k}: {why}" for k, why in not_applicable.items()]
    return "\n".join(lines) + "\n"


def evaluate(key: str, params: Params, root: Path) -> dict[str, float]:
    """Sample, score against the test split and baselines, sweep samplers; write reports/<key>/."""
    import torch

    from components.evaluation.images import METRICS, cycling_labels, image_baselines, image_metrics, save_grid
    from components.resources import peak_rss

    root = Path(root)
    mc = params.model(key)
    net, config = load_model(key, root)
    from components.evaluation.images import not_applicable
    from components.training import set_threads

    set_threads(mc.train.threads)
    n, s = mc.eval.num_samples, mc.sample
    labels = cycling_labels(n, config["num_classes"])
    missing = not_applicable(config["dataset"], root)                # unlabelled: {"class_acc": why}
    scored = None if "class_acc" in missing else labels
    sweep = [(name, *parse_sampler(name, config)) for name in mc.eval.sampler_sweep]  # refuse bad names first
    make_diffusion(config).check_request(torch.as_tensor(labels), s.steps, s.guidance, s.sampler, s.eta)

    sample_memory = []  # one PeakRSS per sampler run: perf/peak_rss_sample_mb is their peak

    def run(sampler: str, steps: int) -> tuple[np.ndarray, float, dict[str, float]]:
        t0 = time.perf_counter()
        with peak_rss() as mem:
            x = sample_images(net, config, labels, sampler=sampler, steps=steps, eta=s.eta,
                              guidance=s.guidance, seed=mc.train.seed)
        ms = (time.perf_counter() - t0) * 1000 / max(n, 1)
        sample_memory.append(mem)
        return x, ms, image_metrics(x, scored, config["dataset"], root)

    results: dict[tuple[str, int], tuple[np.ndarray, float, dict[str, float]]] = {}
    rows = []
    for name, sampler, steps in sweep:
        if (sampler, steps) not in results:
            results[(sampler, steps)] = run(sampler, steps)
        _, ms, m = results[(sampler, steps)]
        rows.append({"name": name, "sampler": sampler, "steps": steps, "ms_per_item": ms,
                     **{k.split("/", 1)[1]: v for k, v in m.items()}})
    headline = (s.sampler, s.steps)
    if headline not in results:
        results[headline] = run(*headline)
    samples, ms, quality = results[headline]

    metrics: dict[str, float] = {**quality, "perf/sample_ms_per_item": ms,
                                 "perf/peak_rss_sample_mb": max(m.peak_mb for m in sample_memory),
                                 "perf/peak_rss_sample_delta_mb": max(m.delta_mb for m in sample_memory)}
    for r in rows:
        metrics[f"perf/sample_ms_per_item_{r['name']}"] = r["ms_per_item"]
        metrics.update({f"eval/{k}_{r['name']}": r[k] for k in METRICS if k in r})
    baselines = image_baselines(config["dataset"], root, n=n, seed=0)
    metrics.update(baselines)
    if mc.eval.inpaint_samples:  # the headline sampler; the true label is never given
        from components.evaluation.editing import inpaint_evaluation

        metrics.update(inpaint_evaluation(
            lambda lv, keep: inpaint_images(net, config, lv, keep, sampler=s.sampler, steps=s.steps, eta=s.eta,
                                            guidance=s.guidance, jump_length=mc.eval.inpaint_jump,
                                            jump_n_sample=mc.eval.inpaint_resample,
                                            infer_label=mc.eval.inpaint_label == "infer",
                                            label_completions=mc.eval.inpaint_label_completions,
                                            seed=mc.train.seed),
            config["dataset"], root, mc.eval.inpaint_samples))

    out = Layout(root).report_dir(key)
    save_grid(class_rows(samples, labels, config["num_classes"]), out / "samples.png", nrow=10)
    write_json(out / "sampling.json", {"num_samples": n, "guidance": s.guidance, "eta": s.eta,
                                        "headline": {"sampler": s.sampler, "steps": s.steps},
                                        "samplers": rows,
                                        "baselines": baselines})
    table = sampling_table(rows, baselines, missing)
    title = f"# {key}: sampling speed and quality ({n} images, guidance {s.guidance})"
    write_text(out / "sampling.md", f"{title}\n\n{table}")
    write_json(out / "metrics.json", metrics)
    return metrics
