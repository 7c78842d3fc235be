"""Text-to-image by transduction: the encoder-decoder transformer writes an image's pixels given a prompt.

    metrics = train("captions-encdec", params, root)      # models/captions-encdec/model.pt (EncDec)
    metrics = evaluate("captions-encdec", params, root)   # reports/captions-encdec/: metrics, samples.png
    x = sample_prompts(net, config, ["a thick slanted seven"])   # (1, H, W) in [0, 1]; colour: (1, H, W, C)

The network is pydoc-seq2seq's EncDec (components/models/encdec.py) unchanged: the encoder reads
the prompt's characters (components.tokenizer.PromptTokenizer: start id, characters, padding
masked out), the decoder writes the image's image_size^2 x C values (components.tokenizer.image_tokens:
raster order, a colour pixel's C = 3 channel values consecutive; a grey image's tokens are its
pixels as always), one token a step,
cross-attending to the encoded prompt; decoding caches the self-attention keys/values and the
cross-attention keys/values (computed once a prompt). EncDec has one token table for source,
target and output, laid out as

    0 .. levels-1                 the levels, per channel (the only ids the decoder may write)
    levels .. levels+P-1          the prompt tokenizer's P ids, shifted by levels
    levels+P                      the decoder's start marker

The loss is the cross-entropy of every value given the prompt and the values before it, over the
levels only; each step draws one of every image's captions (as captions-unet does). There is
no end marker: the decoder writes exactly image_size^2 x C tokens (encdec.target_len).

Evaluation uses captions-unet's metrics (components/families/captions.py: prompt_scores,
prompt_baselines) with the same names, plus eval/bits_per_dim of the test images given their
first captions (nats over every value, H*W*C, in bits) and perf/decode_ms_per_image_{cached,nocache}.
Images are (N, H, W) for C == 1 and (N, H, W, C) for C == 3, in and out.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from components.config import EncDecConfig, ModelConfig, Params
from components.errors import ModelError
from components.families import base, seq2seq
from components.files import write_json, write_text
from components.layout import Layout
from components.spec import ModelSpec

EVAL_BATCH = 128
EVAL_BATCH_TOKENS = EVAL_BATCH * 64   # prompts decoded or scored at once: at most this many pixel tokens
SPEED_PROMPTS = 4          # prompts decoded one at a time for the perf/decode figures


def eval_batch(config: dict[str, Any], batch_size: int = EVAL_BATCH) -> int:
    """Prompts per network batch: batch_size, fewer for long (large or colour) images so that the
    caches and activations stay bounded (8x8 grey keeps its 128)."""
    return max(1, min(int(batch_size), EVAL_BATCH_TOKENS // int(config["encdec"]["target_len"])))


class CaptionsEncDecError(ModelError):
    """A prompt-to-pixels encoder-decoder cannot be trained, evaluated or sampled as asked; one line."""


# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------

def tokenizer(config: dict[str, Any]):
    """The model's PromptTokenizer (its captions' characters; context = encdec.source_len)."""
    from components.tokenizer import PromptTokenizer

    return PromptTokenizer(config["vocab"], config["encdec"]["source_len"])


def prompt_tensors(config: dict[str, Any], prompts: list[str], *, required: bool = True):
    """(src (B, L) int64 in the shared token table, src_mask (B, L) bool) of the prompts; bad
    prompts (empty when required, unknown characters, too long) refused in one line."""
    import torch

    tok = tokenizer(config)
    ids, _ = tok.batch(prompts, required=required)
    ids = torch.from_numpy(ids)
    return ids + config["levels"], ids != tok.pad_id


def pixel_tensors(config: dict[str, Any], x: np.ndarray):
    """(tgt_in (B, D) = [start] + first D-1 tokens, tgt_out (B, D) = the D tokens) of images of levels
    (B, H, W) or (B, H, W, C); D = H*W*C."""
    import torch

    from components.tokenizer import image_tokens

    px = torch.from_numpy(image_tokens(x))
    start = torch.full((len(px), 1), config["bos_id"], dtype=torch.long)
    return torch.cat([start, px[:, :-1]], dim=1), px


# ---------------------------------------------------------------------------
# The Family contract (components/families/base.py)
# ---------------------------------------------------------------------------

def check(key: str, mc: ModelConfig) -> None:
    if mc.backbone != "encdec-pixels":
        raise CaptionsEncDecError(f"models.{key}.backbone: {mc.backbone!r} is not the prompt-to-pixels "
                                  "encoder-decoder (encdec-pixels)")
    c = mc.encdec
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
        raise CaptionsEncDecError(f"models.{key}.encdec.n_embd: {c.n_embd} must be n_head ({c.n_head}) x an even "
                                  "head size")
    if c.truncate_source:
        raise CaptionsEncDecError(f"models.{key}.encdec.truncate_source: prompts are never cut; set it to false")
    if not mc.sample.temperature > 0:
        raise CaptionsEncDecError(f"models.{key}.sample.temperature: must be > 0, got {mc.sample.temperature}")


def model_config(key: str, mc: ModelConfig, manifest: dict, root: Optional[Path] = None) -> dict[str, Any]:
    """The model spec: the encoder-decoder's shape, the captions' vocab, the token layout."""
    from components.tokenizer import PromptTokenizer

    check(key, mc)
    if manifest.get("kind") != "captions":
        raise CaptionsEncDecError(f"models.{key}.dataset: {mc.dataset} holds {manifest.get('kind')} data; "
                                  "a prompt-to-pixels model needs captioned images")
    from components.tokenizer import image_token_count

    c = mc.encdec
    s, levels, channels = int(manifest["image_size"]), int(manifest["levels"]), int(manifest.get("channels", 1) or 1)
    need = image_token_count(s, channels)
    if c.target_len != need:
        what = f"{need} pixels ({s}x{s})" if channels == 1 else f"{need} values ({s}x{s} pixels x {channels} channels)"
        raise CaptionsEncDecError(f"models.{key}.encdec.target_len: {c.target_len}, but {mc.dataset}'s images have "
                                  f"{what}; set it to {need}")
    tok = PromptTokenizer.for_dataset(manifest, c.source_len, f"models.{key}.encdec.source_len")
    bos = levels + tok.vocab_size
    spec = ModelSpec(model=key, backbone=mc.backbone, dataset=mc.dataset, kind="image",
                     network=dataclasses.asdict(c), sample={"temperature": mc.sample.temperature,
                                                            "top_k": mc.sample.top_k},
                     image_size=s, channels=channels, levels=levels, classes=tuple(manifest.get("classes") or ()),
                     vocab=tok.vocab, vocab_size=bos + 1).to_config()
    spec.update(bos_id=bos, eos_id=bos, start_id=tok.start_id + levels, pad_id=tok.pad_id + levels,
                allowed_tokens=levels, caption_thresholds=manifest.get("caption_thresholds"))
    return spec


def build_network(config: dict[str, Any]):
    from components.models.encdec import EncDec

    return EncDec(EncDecConfig(**config["encdec"]), config["vocab_size"])


def training_data(key: str, mc: ModelConfig, config: dict[str, Any], root: Path):
    """(get_batch(step, gen) -> (src, src_mask, tgt_in, tgt_out), pixels per batch); each row's
    prompt is one of its image's captions, drawn per step."""
    import torch

    from components.data import load_captions, load_images
    from components.families.captions import caption_table, trim_padding

    x, _ = load_images(mc.dataset, "train", root)
    table, counts = caption_table(load_captions(mc.dataset, "train", root), tokenizer(config))
    ids = torch.from_numpy(table)                                            # (N, K, L) prompt ids
    n_caps = torch.from_numpy(counts)
    pad = config["pad_id"] - config["levels"]
    tgt_in, tgt_out = pixel_tensors(config, x)
    if tgt_out.shape[1] != config["encdec"]["target_len"]:
        raise CaptionsEncDecError(f"datasets.{mc.dataset}: the train split's images are {tuple(x.shape[1:])} "
                                  f"({tgt_out.shape[1]} values), but the manifest gives "
                                  f"{config['encdec']['target_len']} ({config.get('channels', 1)} channel(s)); "
                                  "prepare the dataset again (genflow stage prepare)")
    B = mc.train.batch_size

    def get_batch(step: int, gen: torch.Generator):
        idx = torch.randint(len(x), (B,), generator=gen)
        pick = (torch.rand(B, generator=gen) * n_caps[idx]).long()           # one of each image's captions
        src = trim_padding(ids[idx, pick], pad)                               # the batch's longest prompt
        return src + config["levels"], src != pad, tgt_in[idx], tgt_out[idx]
    return get_batch, B * tgt_out.shape[1]


def pixel_logits(model, config: dict[str, Any], src, src_mask, tgt_in):
    """(B, D, levels): the decoder's logits over the grey levels (teacher forcing)."""
    return model(src, tgt_in, src_mask)[..., :config["levels"]]


def loss_fn(config: dict[str, Any]):
    """Cross-entropy (nats per pixel) of every pixel given the prompt and the pixels before it."""
    import torch.nn.functional as F

    def loss(model, batch, gen):
        src, src_mask, tgt_in, tgt_out = batch
        logits = pixel_logits(model, config, src, src_mask, tgt_in)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1))
    return loss


# forward + backward FLOPs per target token (here: per pixel) at the full prompt context: the
# encoder-decoder's own count, the same network as pydoc-seq2seq's
flops_per_item = seq2seq.flops_per_item


def probe_step(net, config: dict[str, Any], batch_size: int, gen):
    """(loss() of a training step on random prompts and pixels of full length, pixels per step)."""
    import torch

    c, dev = config["encdec"], gen.device
    src = torch.randint(config["levels"], config["bos_id"], (batch_size, c["source_len"]), generator=gen, device=dev)
    tgt = torch.randint(config["levels"], (batch_size, c["target_len"] + 1), generator=gen, device=dev)
    mask = torch.ones_like(src, dtype=torch.bool)
    loss = loss_fn(config)
    return (lambda: loss(net, (src, mask, tgt[:, :-1], tgt[:, 1:]), gen)), batch_size * c["target_len"]


def load_model(key: str, root: Path):
    """(EncDec in eval mode with the trained weights, its model spec) from models/<key>/model.pt."""
    return base.load_model(key, root, CaptionsEncDecError, ("encdec-pixels",))


train = base.train   # the one training entry (components/families/base.py)


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

def sample_prompts(net, config: dict[str, Any], prompts: list[str], *, temperature: Optional[float] = None,
                   top_k: Optional[int] = None, seed: int = 0, cache: str = "full",
                   batch_size: int = EVAL_BATCH) -> np.ndarray:
    """One image per prompt, (N, H, W) float32 in [0, 1] on the data's levels ((N, H, W, C) for colour):
    the decoder's values drawn one at a time (temperature, top_k: the model's sample defaults). cache: full (both
    caches), self (cross-attention keys/values recomputed each step), none (recompute everything).
    Bad prompts are refused in one line before any network call."""
    import torch

    from components.tokenizer import tokens_to_images

    s = config.get("sample", {})
    temperature = float(s.get("temperature", 1.0) if temperature is None else temperature)
    top_k = int(s.get("top_k", 0) if top_k is None else top_k)
    batch_size = eval_batch(config, batch_size)
    tensors = [prompt_tensors(config, prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    gen = torch.Generator().manual_seed(seed)
    size, levels, D = config["image_size"], config["levels"], config["encdec"]["target_len"]
    channels = int(config.get("channels", 1))
    out = []
    with torch.inference_mode():
        for src, mask in tensors:
            rows = net.generate(src, mask, config["bos_id"], config["eos_id"], D, greedy=False,
                                temperature=temperature, top_k=top_k, allowed_tokens=levels, generator=gen,
                                cache=cache)
            out.append(tokens_to_images(np.asarray(rows, dtype=np.float32).reshape(len(src), D), size, channels)
                       / (levels - 1))
    empty = (0, size, size) if channels == 1 else (0, size, size, channels)
    return np.concatenate(out) if out else np.zeros(empty, np.float32)


def pixel_nll(net, config: dict[str, Any], x: np.ndarray, prompts: list[str]) -> float:
    """Summed nats of the images of levels x (N, H, W) or (N, H, W, C) given their prompts."""
    import torch
    import torch.nn.functional as F

    nats = 0.0
    with torch.inference_mode():
        step = eval_batch(config)
        for i in range(0, len(x), step):
            src, mask = prompt_tensors(config, prompts[i:i + step])
            tgt_in, tgt_out = pixel_tensors(config, x[i:i + step])
            logits = pixel_logits(net, config, src, mask, tgt_in)
            nats += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), reduction="sum"))
    return nats


# ---------------------------------------------------------------------------
# Evaluation (captions-unet's metrics, components/families/captions.py)
# ---------------------------------------------------------------------------

def decode_speed(net, config: dict[str, Any], prompts: list[str]) -> dict[str, float]:
    """perf/decode_ms_per_image_{cached,nocache}: one prompt at a time, both caches or none (median of 3);
    an image of more than NOCACHE_MAX_TOKENS values: the cached figure alone, one prompt timed once."""
    from components.resources import NOCACHE_MAX_TOKENS, median_seconds

    long = int(config["encdec"]["target_len"]) > NOCACHE_MAX_TOKENS
    prompts = prompts[:1] if long else prompts
    out = {}
    for cache, name in (("full", "cached"),) + ((("none", "nocache"),) if not long else ()):
        def run(cache=cache):
            for p in prompts:
                sample_prompts(net, config, [p], cache=cache)
        out[f"perf/decode_ms_per_image_{name}"] = median_seconds(run, repeats=1 if long else 3) * 1000 / len(prompts)
    return out


def evaluate(key: str, params: Params, root: Path) -> dict[str, float]:
    """One image per test prompt (the test split's first captions, as captions-unet): FD, prompt
    accuracy, attribute error and their baselines; bits/dim of the test images given their prompts."""
    from components.data import load_captions, load_images
    from components.evaluation.images import image_baselines, image_metrics, not_applicable, save_grid
    from components.families.captions import (
        PROMPT_METRICS,
        eval_prompts,
        evaluation_prompts,
        label_only_prompt,
        prompt_baselines,
        prompt_scores,
    )
    from components.families.diffusion import class_rows
    from components.training import set_threads

    root = Path(root)
    mc = params.model(key)
    check(key, mc)
    net, config = load_model(key, root)
    set_threads(mc.train.threads)
    missing = not_applicable(config["dataset"], root)
    if missing:   # a user's captions (no classes): the images alone are scored, as captions-unet does
        records = load_captions(config["dataset"], "test", root)
        prompts = eval_prompts(records, mc.eval.num_samples)
    else:
        records, prompts, digits = evaluation_prompts(key, config, root, mc.eval.num_samples, CaptionsEncDecError)

    t0 = time.perf_counter()
    samples = sample_prompts(net, config, prompts, seed=mc.train.seed)
    ms = (time.perf_counter() - t0) * 1000 / max(len(prompts), 1)
    if missing:
        metrics: dict[str, float] = {**image_metrics(samples, None, config["dataset"], root),
                                     "perf/sample_ms_per_item": ms,
                                     **image_baselines(config["dataset"], root, n=len(prompts), seed=0)}
    else:
        metrics = {**prompt_scores(samples, prompts, config, root), "perf/sample_ms_per_item": ms}
        x_label = sample_prompts(net, config, [label_only_prompt(p) for p in prompts], seed=mc.train.seed)
        metrics.update(prompt_baselines(config, root, prompts, x_label))

    x_test, _ = load_images(config["dataset"], "test", root)
    nats = pixel_nll(net, config, x_test, [r["texts"][0] for r in records])
    metrics["eval/bits_per_dim"] = nats / (x_test[0].size * len(x_test) * math.log(2))
    metrics["baseline/uniform_bits_per_dim"] = math.log2(config["levels"])
    metrics.update(decode_speed(net, config, prompts[:SPEED_PROMPTS]))

    out = Layout(root).report_dir(key)
    if missing:
        save_grid(samples[:40], out / "samples.png", nrow=min(10, max(len(samples), 1)))
        write_text(out / "prompts.md", f"# {key}: prompt adherence\n\n" + "".join(
            f"{k}: {missing.get('class_acc', 'not applicable (no classes)')}\n" for k in PROMPT_METRICS))
    else:
        save_grid(class_rows(samples, digits, len(config["classes"])), out / "samples.png", nrow=10)
    write_json(out / "metrics.json", metrics)
    return metrics


__all__ = ["check", "model_config", "training_data", "build_network", "loss_fn", "flops_per_item", "probe_step",
           "evaluate", "load_model", "train", "sample_prompts", "pixel_nll"]
