"""Text-to-image diffusion over captioned images: train, evaluate and load a prompt-conditioned U-Net.

    metrics = train("captions-unet", params, root)      # models/captions-unet/model.pt (U-Net + text encoder)
    metrics = evaluate("captions-unet", params, root)   # reports/captions-unet/: metrics, guidance sweep, samples
    x = sample_prompts(net, config, ["a thick, right-slanted seven"], guidance=2.0)   # (1, H, W[, C]) in [0, 1]

The same process as digits-unet (components/models/diffusion.py: loss, DDPM/DDIM, guidance) and the
same training loop (components/training.py via base.train). The condition of a batch row is its
prompt; the process's "class ids" are the rows of the batch's prompt table, so its label dropout
and guidance work unchanged: row i of a batch of B is the i-th prompt and row B the empty prompt
(the null condition). Each step draws one of every image's captions; p_uncond of the rows are
replaced by the empty prompt. The text encoder is part of the network, so one optimizer trains both.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from components.config import CrossAttentionConfig, ModelConfig, Params, TextEncoderConfig
from components.errors import ModelError
from components.families import base
from components.families.diffusion import (
    check_data_shape,
    image_shape,
    levels_to_model,
    manifest_channels,
    model_to_unit,
)
from components.files import write_json, write_text
from components.layout import Layout
from components.spec import ModelSpec


class CaptionsFamilyError(ModelError):
    """A prompt-conditioned model cannot be trained, evaluated or loaded as asked; the message says why."""


def prompt_backbones() -> dict[str, base.Backbone]:
    """The registry's backbones this module trains (module "captions")."""
    return {name: b for name, b in base.BACKBONES.items() if b.module == "captions"}


# ---------------------------------------------------------------------------
# The Family contract (components/families/base.py)
# ---------------------------------------------------------------------------

def check(key: str, mc: ModelConfig) -> None:
    known = prompt_backbones()
    if mc.family != "diffusion" or mc.backbone not in known:
        raise CaptionsFamilyError(f"models.{key}.backbone: {mc.backbone!r} is not a prompt-conditioned diffusion "
                                  f"backbone; known: {', '.join(known)}")


def tokenizer(config: dict[str, Any]):
    """The model's PromptTokenizer (its captions' characters, its encoder's context)."""
    from components.tokenizer import PromptTokenizer

    return PromptTokenizer(config["vocab"], config["textenc"]["context"])


def model_config(key: str, mc: ModelConfig, manifest: dict, root: Optional[Path] = None) -> dict[str, Any]:
    """The model spec: the U-Net's shape, the text encoder's and the cross-attention's, the captions' vocab."""
    from components.tokenizer import PromptTokenizer

    check(key, mc)
    if manifest.get("kind") != "captions":
        raise CaptionsFamilyError(f"models.{key}.dataset: {mc.dataset} holds {manifest.get('kind')} data; "
                                  "a prompt-conditioned model needs captioned images")
    textenc = mc.textenc or TextEncoderConfig()
    tok = PromptTokenizer.for_dataset(manifest, textenc.context, f"models.{key}.textenc.context")
    spec = ModelSpec(model=key, backbone=mc.backbone, dataset=mc.dataset, kind="image",
                     network=dataclasses.asdict(mc.unet), process=dataclasses.asdict(mc.diffusion),
                     sample=dataclasses.asdict(mc.sample), image_size=int(manifest["image_size"]),
                     channels=manifest_channels(key, mc, manifest, CaptionsFamilyError),
                     levels=int(manifest["levels"]), classes=tuple(manifest.get("classes") or ()),
                     vocab=tok.vocab, vocab_size=tok.vocab_size).to_config()
    spec.update(textenc=dataclasses.asdict(textenc),
                cross_attention=dataclasses.asdict(mc.cross_attention or CrossAttentionConfig()),
                start_id=tok.start_id, pad_id=tok.pad_id,
                caption_thresholds=manifest.get("caption_thresholds"))
    return spec


def build_network(config: dict[str, Any]):
    from components.models.unet_text import CrossAttentionConfig, TextEncoderConfig, TextUNet, UNetConfig

    return TextUNet(UNetConfig(**config["unet"]), TextEncoderConfig(**config["textenc"]),
                    CrossAttentionConfig(**config["cross_attention"]), image_size=config["image_size"],
                    vocab_size=config["vocab_size"], pad_id=config["pad_id"], in_channels=config["channels"])


def null_prompts(n: int, length: int, config: dict[str, Any]):
    """(n, length) ids of the empty prompt (the start id, then padding): the null condition."""
    import torch

    ids = torch.full((n, length), config["pad_id"], dtype=torch.long)
    ids[:, 0] = config["start_id"]
    return ids


def process(config: dict[str, Any], prompts: int):
    """The digits-unet process over a table of `prompts` conditions: ids 0..prompts-1, null id = prompts."""
    from components.models.diffusion import GaussianDiffusion

    d = config["diffusion"]
    return GaussianDiffusion(d["timesteps"], d["schedule"], prompts, d["p_uncond"])


def caption_table(records: list[dict], tok) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, K, L) int64, counts (N,)): every image's captions tokenized, padded to K captions
    (repeating its first) and to the longest caption + 1."""
    K = max(len(r["texts"]) for r in records)
    flat = [r["texts"][k] if k < len(r["texts"]) else r["texts"][0] for r in records for k in range(K)]
    ids, _ = tok.batch(flat)
    return ids.reshape(len(records), K, -1), np.array([len(r["texts"]) for r in records], dtype=np.int64)


def training_data(key: str, mc: ModelConfig, config: dict[str, Any], root: Path):
    """(get_batch(step, gen) -> (images (B, C, H, W) in [-1, 1], prompt ids (B, L)), images per batch);
    each row's prompt is one of its image's captions, drawn per step."""
    import torch

    from components.data import load_captions, load_images

    x, _ = load_images(mc.dataset, "train", root)
    table, counts = caption_table(load_captions(mc.dataset, "train", root), tokenizer(config))
    check_data_shape(x, config, mc.dataset, CaptionsFamilyError)
    x0 = torch.from_numpy(levels_to_model(x, config["levels"]))             # (N, C, H, W)
    ids, n_caps = torch.from_numpy(table), torch.from_numpy(counts)          # (N, K, L), (N,)
    B = mc.train.batch_size

    def get_batch(step: int, gen: torch.Generator):
        idx = torch.randint(len(x0), (B,), generator=gen)
        pick = (torch.rand(B, generator=gen) * n_caps[idx]).long()           # one of each image's captions
        return x0[idx], trim_padding(ids[idx, pick], config["pad_id"])
    return get_batch, B


def trim_padding(ids, pad_id: int):
    """ids (B, L) without the columns that are padding in every row: the batch's longest prompt sets
    its length, not the dataset's. Exact: padding sits after each prompt and is masked out of every
    attention and mean, so the real positions' states do not change (the captions average 27
    characters against a longest of 59; the text encoder's cost follows the length)."""
    longest = int((ids != pad_id).sum(1).max())
    return ids[:, :max(longest, 1)]


def loss_fn(config: dict[str, Any]):
    """The DDPM loss of digits-unet, conditioned on the batch's prompts; p_uncond of them dropped to
    the empty prompt (by the process's label dropout, over the batch's prompt table)."""
    import torch

    processes: dict[int, Any] = {}

    def loss(model, batch, gen):
        x0, ids = batch
        B = len(ids)
        table = torch.cat([ids, null_prompts(1, ids.shape[1], config).to(ids.device)])   # row B: the empty prompt
        diffusion = processes.setdefault(B, process(config, B))
        rows = torch.arange(B, device=ids.device)
        return diffusion.training_loss(lambda x, t, i: model(x, t, table[i]), x0, rows, gen)
    return loss


def flops_per_item(net, config: dict[str, Any], batch: int = 2) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    s, c = config["image_size"], config["channels"]
    dev = base.device_of(net)
    x0 = torch.zeros(batch, c, s, s, device=dev)
    ids = null_prompts(batch, config["textenc"]["context"], config).to(dev)   # the longest prompt
    with FlopCounterMode(display=False) as counter:
        loss_fn(config)(net, (x0, ids), torch.Generator(device=dev).manual_seed(0)).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def probe_step(net, config: dict[str, Any], batch_size: int, gen):
    import torch

    s, c = config["image_size"], config["channels"]
    dev = gen.device
    x0 = torch.rand(batch_size, c, s, s, generator=gen, device=dev) * 2 - 1
    L = min(32, config["textenc"]["context"])
    ids = torch.randint(len(config["vocab"]), (batch_size, L), generator=gen, device=dev)
    ids[:, 0] = config["start_id"]
    loss = loss_fn(config)
    return (lambda: loss(net, (x0, ids), gen)), batch_size


def load_model(key: str, root: Path):
    return base.load_model(key, root, CaptionsFamilyError, tuple(prompt_backbones()))


train = base.train


# ---------------------------------------------------------------------------
# Sample
# ---------------------------------------------------------------------------

def sample_prompts(net, config: dict[str, Any], prompts: list[str], *, sampler: str = "ddim", steps: int = 50,
                   eta: float = 0.0, guidance: float = 1.0, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """One image per prompt, (N, H, W) grey or (N, H, W, C) colour, float32 in [0, 1] on the data's levels. Bad prompts
    (empty, unknown characters, too long) are refused in one line before any network call."""
    import torch

    tok = tokenizer(config)
    for p in prompts:                                                         # refuse bad prompts first
        tok.encode_prompt(p, required=True)
    process(config, max(len(prompts), 1)).check_request(torch.arange(len(prompts)), steps, guidance, sampler, eta)
    gen = torch.Generator().manual_seed(seed)
    shape = (config["channels"], config["image_size"], config["image_size"])
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            ids, _ = tok.batch(chunk + [""], required=False)                  # last row: the empty prompt
            states, mask = net.text(torch.from_numpy(ids))                    # encoded once for every step
            n = len(chunk)

            def denoise(x, t, rows, states=states, mask=mask):
                return net.denoise_states(x, t, states[rows], mask[rows])
            x = process(config, n).sample(denoise, torch.arange(n), shape, sampler=sampler, steps=steps, eta=eta,
                                          guidance=guidance, generator=gen)
            out.append(model_to_unit(x.numpy(), config["levels"]))
    return np.concatenate(out) if out else np.zeros((0, *image_shape(config)), np.float32)


# ---------------------------------------------------------------------------
# Evaluate: prompt adherence against guidance scale
# ---------------------------------------------------------------------------

def evaluation_prompts(key: str, config: dict[str, Any], root: Path, n: int,
                 error: type[Exception]) -> tuple[list[dict], list[str], np.ndarray]:
    """(the test split's caption records, n evaluation prompts, the digit each prompt asks for);
    `error` in one line when the dataset has no digit classes (a user's captions)."""
    from components.data import load_captions
    from components.evaluation.images import not_applicable

    if not config.get("classes") or not_applicable(config["dataset"], root):
        raise error(f"models.{key}.dataset: {config['dataset']} has no digit classes (a user's captions); prompt "
                    "accuracy needs labelled captions such as builtin:digits-captions")
    records = load_captions(config["dataset"], "test", root)
    prompts = eval_prompts(records, n)
    return records, prompts, np.array([records[j % len(records)]["label"] for j in range(n)])


def eval_prompts(records: list[dict], n: int) -> list[str]:
    """n prompts from the test split's captions: image j's first caption (every property it has),
    cycling over the split."""
    return [records[j % len(records)]["texts"][0] for j in range(n)]


def label_only_prompt(prompt: str) -> Optional[str]:
    """The prompt reduced to its digit ("a seven"): what a label alone asks for."""
    from components.captions import DIGIT_WORDS, parse_caption, phrase

    digit = parse_caption(prompt)["digit"]
    return None if digit is None else phrase(DIGIT_WORDS[digit], [], "{a} {adjs} {digit}")


def attribute_error(samples: np.ndarray, prompts: list[str], levels: int, cuts: dict) -> float:
    """Mean |bucket asked - bucket measured| over every property a prompt names (buckets 0..2 at the
    dataset's tercile cuts; measured with captions.measure, as the captions were); NaN if none is named."""
    from components.captions import PROPERTIES, bucket, measure, parse_caption

    grey = np.round(np.asarray(samples) * (levels - 1))
    props = measure(grey, levels)
    errors = []
    for i, p in enumerate(prompts):
        asked = parse_caption(p)
        errors += [abs(asked[k] - bucket(float(props[k][i]), cuts[k])) for k in PROPERTIES if asked[k] is not None]
    return float(np.mean(errors)) if errors else float("nan")


def prompt_scores(samples: np.ndarray, prompts: list[str], config: dict[str, Any], root: Path) -> dict[str, float]:
    """eval/fd ... (image metrics for the digits the prompts ask for), eval/prompt_acc, eval/attribute_error."""
    from components.captions import parse_caption
    from components.evaluation.images import image_metrics

    digits = np.array([parse_caption(p)["digit"] for p in prompts])
    m = image_metrics(samples, digits.astype(np.int64), config["dataset"], root)
    m["eval/prompt_acc"] = m["eval/class_acc"]
    m["eval/attribute_error"] = attribute_error(samples, prompts, config["levels"], config["caption_thresholds"])
    return m


def prompt_baselines(config: dict[str, Any], root: Path, prompts: list[str], x_label: np.ndarray) -> dict[str, float]:
    """The image baselines (components/evaluation/images.py) for len(prompts) images, and the
    attribute error of the real test images under their own first captions (prompts are
    eval_prompts of the test split) and of x_label, the model's images for the digit word alone."""
    from components.data import load_captions, load_images
    from components.evaluation.images import image_baselines

    n_test = len(load_captions(config["dataset"], "test", root))
    x_real, _ = load_images(config["dataset"], "test", root)
    real = x_real[[j % n_test for j in range(len(prompts))]] / (config["levels"] - 1)
    cuts = config["caption_thresholds"]
    baselines = image_baselines(config["dataset"], root, n=len(prompts), seed=0)
    baselines["baseline/real_attribute_error"] = attribute_error(real, prompts, config["levels"], cuts)
    baselines["baseline/label_only_attribute_error"] = attribute_error(x_label, prompts, config["levels"], cuts)
    return baselines


def guidance_table(rows: list[dict], baselines: dict[str, float]) -> str:
    cols = ["fd", "prompt_acc", "attribute_error"]
    lines = ["| guidance | ms/image | " + " | ".join(cols) + " |", "|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        values = " | ".join(f"{r[c]:.4f}" for c in cols)
        lines.append(f"| {r['guidance']:g} | {r['ms_per_item']:.2f} | {values} |")
    lines.append(f"| real test images, own captions | | {baselines['baseline/real_fd']:.4f} | | "
                 f"{baselines['baseline/real_attribute_error']:.4f} |")
    lines.append(f"| the digit word alone as the prompt (headline guidance) | | | | "
                 f"{baselines['baseline/label_only_attribute_error']:.4f} |")
    return "\n".join(lines) + "\n"


def evaluate(key: str, params: Params, root: Path) -> dict[str, float]:
    """Sample one image per test prompt at every guidance scale of eval.guidance_sweep (and the
    headline sample.guidance); score FD, prompt accuracy and attribute error, with the baselines:
    real test images with their own captions, and the same model prompted with the digit word alone."""
    from components.evaluation.images import not_applicable, save_grid
    from components.families.diffusion import class_rows
    from components.training import set_threads

    root = Path(root)
    mc = params.model(key)
    net, config = load_model(key, root)
    set_threads(mc.train.threads)
    missing = not_applicable(config["dataset"], root)
    if missing:   # unlabelled captions (a user's, or one class): the images alone are scored
        return evaluate_unlabelled(key, mc, net, config, root, missing)
    records, prompts, digits = evaluation_prompts(key, config, root, mc.eval.num_samples, CaptionsFamilyError)
    s = mc.sample
    scales = sorted(set(mc.eval.guidance_sweep or []) | {float(s.guidance)})

    def run(prompts: list[str], guidance: float) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        x = sample_prompts(net, config, prompts, sampler=s.sampler, steps=s.steps, eta=s.eta, guidance=guidance,
                           seed=mc.train.seed)
        return x, (time.perf_counter() - t0) * 1000 / max(len(prompts), 1)

    rows, headline = [], None
    for w in scales:
        x, ms = run(prompts, w)
        m = prompt_scores(x, prompts, config, root)
        rows.append({"guidance": w, "ms_per_item": ms, **{k.split("/", 1)[1]: v for k, v in m.items()}})
        if w == float(s.guidance):
            headline = (x, ms, m)
    samples, ms, quality = headline

    x_label, _ = run([label_only_prompt(p) for p in prompts], float(s.guidance))
    baselines = prompt_baselines(config, root, prompts, x_label)

    metrics: dict[str, float] = {**quality, "perf/sample_ms_per_item": ms, **baselines}
    for r in rows:
        tag = f"g{r['guidance']:g}".replace(".", "_")
        metrics[f"perf/sample_ms_per_item_{tag}"] = r["ms_per_item"]
        metrics.update({f"eval/{k}_{tag}": r[k] for k in ("fd", "prompt_acc", "attribute_error")})

    out = Layout(root).report_dir(key)
    save_grid(class_rows(samples, digits, len(config["classes"])), out / "samples.png", nrow=10)
    write_json(out / "guidance.json", {"num_samples": len(prompts), "sampler": s.sampler, "steps": s.steps,
                                       "eta": s.eta, "headline_guidance": s.guidance, "rows": rows,
                                       "baselines": baselines, "prompts": prompts[:20]})
    title = (f"# {key}: prompt adherence against guidance ({len(prompts)} test prompts, {s.sampler} {s.steps} steps)")
    write_text(out / "guidance.md", f"{title}\n\n{guidance_table(rows, baselines)}")
    write_json(out / "metrics.json", metrics)
    return metrics


PROMPT_METRICS = ("prompt_acc", "attribute_error")   # what needs the digit classes of builtin:digits-captions


def evaluate_unlabelled(key: str, mc: ModelConfig, net, config: dict[str, Any], root: Path,
                        missing: dict[str, str]) -> dict[str, float]:
    """evaluate for captions without classes (manifest "labelled": false, one class): one image per test
    caption (its first) at every guidance scale, scored by images.py without labels (eval/fd, eval/kid,
    ...) beside its baselines; prompt accuracy and attribute error need digit classes, so guidance.md
    says why they are not applicable instead of a number."""
    from components.data import load_captions
    from components.evaluation.images import METRICS, image_baselines, image_metrics, save_grid

    s = mc.sample
    prompts = eval_prompts(load_captions(config["dataset"], "test", root), mc.eval.num_samples)
    scales = sorted(set(mc.eval.guidance_sweep or []) | {float(s.guidance)})
    rows, headline = [], None
    for w in scales:
        t0 = time.perf_counter()
        x = sample_prompts(net, config, prompts, sampler=s.sampler, steps=s.steps, eta=s.eta, guidance=w,
                           seed=mc.train.seed)
        ms = (time.perf_counter() - t0) * 1000 / max(len(prompts), 1)
        m = image_metrics(x, None, config["dataset"], root)
        rows.append({"guidance": w, "ms_per_item": ms, **{k.split("/", 1)[1]: v for k, v in m.items()}})
        if w == float(s.guidance):
            headline = (x, ms, m)
    samples, ms, quality = headline
    baselines = image_baselines(config["dataset"], root, n=len(prompts), seed=0)
    metrics: dict[str, float] = {**quality, "perf/sample_ms_per_item": ms, **baselines}
    cols = [c for c in METRICS if all(c in r for r in rows)]
    lines = ["| guidance | ms/image | " + " | ".join(cols) + " |", "|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        tag = f"g{r['guidance']:g}".replace(".", "_")
        metrics[f"perf/sample_ms_per_item_{tag}"] = r["ms_per_item"]
        metrics.update({f"eval/{c}_{tag}": r[c] for c in cols})
        values = " | ".join(f"{r[c]:.4f}" for c in cols)
        lines.append(f"| {r['guidance']:g} | {r['ms_per_item']:.2f} | {values} |")
    real = " | ".join(f"{baselines.get(f'baseline/real_{c}', float('nan')):.4f}" for c in cols)
    lines.append(f"| real test images | | {real} |")
    why = missing.get("class_acc", "not applicable (no classes)")
    lines += [""] + [f"{k}: {why}" for k in PROMPT_METRICS]

    out = Layout(root).report_dir(key)
    save_grid(samples[:40], out / "samples.png", nrow=min(10, max(len(samples), 1)))
    write_json(out / "guidance.json", {"num_samples": len(prompts), "sampler": s.sampler, "steps": s.steps,
                                       "eta": s.eta, "headline_guidance": s.guidance, "rows": rows,
                                       "baselines": baselines, "prompts": prompts[:20],
                                       "not_applicable": {k: why for k in PROMPT_METRICS}})
    title = f"# {key}: images against guidance ({len(prompts)} test prompts, {s.sampler} {s.steps} steps)"
    write_text(out / "guidance.md", f"{title}\n\n" + "\n".join(lines) + "\n")
    write_json(out / "metrics.json", metrics)
    return metrics


__all__ = ["check", "model_config", "training_data", "build_network", "loss_fn", "flops_per_item", "probe_step",
           "evaluate", "load_model", "train", "sample_prompts", "attribute_error", "prompt_scores", "prompt_baselines",
           "eval_prompts", "evaluation_prompts", "label_only_prompt", "caption_table", "evaluate_unlabelled"]
