"""Transformer family: one GPT for text (next character), images (next pixel) and pairs (target given source).

    train(key, params, root)     -> models/<key>/model.pt, train_metrics.json; returns train/ + perf/ metrics
    evaluate(key, params, root)  -> reports/<key>/metrics.json + samples; returns eval/ perf/ baseline/ metrics
    load_model(key, root)        -> (GPT with weights, its config dict), e.g. for ONNX export

The prepared dataset's manifest decides the kind:

- text: ids are characters of the train split's vocabulary (components.tokenizer), plus one
  unknown id. A batch is B random windows of block_size + 1 characters of the train text.
  Evaluation: bits per character on the test split (sliding window, see
  components.evaluation.text.model_bits_per_char), interpolated Kneser-Ney n-gram baselines on
  the same split, samples from the prompt, and sampling speed with and without the KV cache.
- image: a sequence is [class token] + the image's H*W*C values (components.tokenizer.image_tokens):
  the pixels in raster order, each pixel's C channel values consecutive (C = 1 grey, 3 colour: R, G,
  B of pixel 0, then pixel 1, ...); a value is one of ``levels`` levels per channel (ids
  0..levels-1), class c is id levels + c, so images are generated class by class. A grey image's
  sequence is its H*W pixels, as it always was. Predictions are restricted to the levels (class ids
  never count as values), in training, likelihood and sampling alike. Unlabelled data (manifest
  "labelled": false, one class) trains unconditionally: every sequence starts with the one class
  token (id levels), a constant start token, and p(c) = 1. Evaluation: exact bits per dimension,
  unconditional p(x) = sum_c p(c) p(x | c) with p(c) the train split's class shares, and
  conditional on the true class; pixel-model baselines (uniform, independent pixels, one
  logistic regression per pixel); and the shared image metrics on class-conditional samples.
- pairs: the decoder-only answer to the encoder-decoder (components/families/seq2seq.py) on the
  same pairs: a sequence is source + [sep] + target + [eos] (components.tokenizer.PairTokenizer's
  ids), the loss is on the target and end tokens only (the source is context, never predicted).
  Evaluation is the seq2seq family's (components/evaluation/seq2seq.py, the same metric names);
  decoding is greedy or sampled (no beam search for the GPT: sample.decoding beam decodes greedily
  and details.json says so), prompts of one length decoded together.

model.pt = {"state_dict", "config"}; config holds "gpt" (the GPTConfig fields), "vocab_size",
"kind", "dataset", and "vocab" (text) or "levels", "num_classes", "image_size", "channels", "classes",
"class_prior" (images; "labelled": false for unlabelled data).
Images are (N, H, W) for C == 1 and (N, H, W, C) for C == 3 (channels last, as the data layer gives
them); samples are float32 in [0, 1] on the data's levels in the same layout.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from components.config import GPTConfig, ModelConfig, Params
from components.errors import ModelError
from components.families import base
from components.files import write_json, write_text
from components.layout import Layout
from components.resources import NOCACHE_MAX_TOKENS, median_seconds
from components.spec import ModelSpec

LOGREG_MAX_DIMS = 256         # the logistic-regression pixel baseline's largest image (values per image)
IMAGE_BATCH_TOKENS = 512 * 65  # images sampled or scored at once: at most this many tokens (8x8 grey: 512)
FLOP_COUNT_MAX_TOKENS = 4096  # longer contexts: FLOPs per token extrapolated from two shorter ones


def image_batch(batch_size: int, config: dict) -> int:
    """Images per network batch: batch_size, fewer for long (large or colour) images so that the
    activations and the KV cache stay bounded (8x8 grey keeps its 512)."""
    from components.tokenizer import image_token_count

    tokens = image_token_count(config["image_size"], int(config.get("channels", 1))) + 1
    return max(1, min(int(batch_size), IMAGE_BATCH_TOKENS // tokens))


class ModelNotTrainedError(ModelError):
    """models/<key>/model.pt is missing or does not hold a transformer model."""


# ---------------------------------------------------------------------------
# Data as token sequences
# ---------------------------------------------------------------------------

def text_tokenizer(manifest: dict, train_text: str):
    """The character tokenizer of a text dataset (the manifest's vocabulary, else the train split's)."""
    from components.tokenizer import CharTokenizer

    vocab = manifest.get("vocab") or "".join(sorted(set(train_text)))
    return CharTokenizer(vocab)


def image_sequences(x: np.ndarray, y: np.ndarray, levels: int) -> np.ndarray:
    """(N, 1 + H*W*C) int64: the class token levels + y, then the image's values (image_tokens: raster
    order, a pixel's channels consecutive). x may also be tokens already, (N, D)."""
    from components.tokenizer import image_tokens

    tokens = image_tokens(x) if np.ndim(x) in (3, 4) else np.asarray(x).reshape(len(x), -1).astype(np.int64)
    return np.concatenate([(levels + y.astype(np.int64))[:, None], tokens], axis=1)


def image_channels(manifest: dict, x: np.ndarray, where: str) -> int:
    """C of an image dataset: the manifest's "channels" (absent: 1), checked against the arrays."""
    c = int(manifest.get("channels", 1) or 1)
    have = int(x.shape[-1]) if x.ndim == 4 else 1
    if c != have:
        raise ModelError(f"{where}: the manifest says {c} channel(s) but the train split holds images of "
                         f"shape {tuple(x.shape[1:])}; prepare the dataset again (genflow stage prepare)")
    return c


def class_ids(config: dict, y: np.ndarray) -> np.ndarray:
    """The class index of each image: y, or all 0 (the one class) for unlabelled data."""
    if config.get("labelled", True):
        return np.asarray(y, dtype=np.int64)
    return np.zeros(len(y), dtype=np.int64)


def class_prior(y: np.ndarray, num_classes: int) -> list[float]:
    """Class shares of the train split (add-one smoothed so no class has probability 0)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64) + 1.0
    return (counts / counts.sum()).tolist()


# ---------------------------------------------------------------------------
# The Family contract (components/families/base.py): spec, network, batches, loss, cost
# ---------------------------------------------------------------------------

def check(key: str, m: ModelConfig) -> None:
    if m.backbone != "gpt":
        raise ModelNotTrainedError(f"models.{key}.backbone: {m.backbone!r} is not a transformer backbone (gpt)")


def model_config(key: str, m: ModelConfig, manifest: dict, root: Path) -> dict[str, Any]:
    """The model spec: the GPT's shape plus the vocabulary (text) or the pixel/class layout (images)."""
    from components import data

    kind = manifest["kind"]
    T = m.gpt.block_size
    spec = dict(model=key, backbone="gpt", dataset=m.dataset, kind=kind, network=dataclasses.asdict(m.gpt))
    if kind == "text":
        tok = text_tokenizer(manifest, data.load_text(m.dataset, "train", root))
        return ModelSpec(**spec, vocab=tok.vocab, vocab_size=tok.vocab_size).to_config()
    if kind == "pairs":
        from components.families.seq2seq import check_decoding, decoding_defaults, pair_tokenizer

        check_decoding(key, m)
        need = manifest["max_source_chars"] + 1 + manifest["max_target_chars"] + 1   # src, sep, target, eos
        if T < need - 1:
            raise data.DataError(f"models.{key}.gpt.block_size: {T} is shorter than the longest pair of "
                                 f"{m.dataset} ({need - 1} input tokens: source + separator + target); "
                                 f"set it to at least {need - 1}")
        tok = pair_tokenizer(manifest["vocab"])
        return ModelSpec(**spec, vocab=tok.vocab, vocab_size=tok.vocab_size, sample=decoding_defaults(m)).to_config()
    if kind == "image":
        x, y = data.load_images(m.dataset, "train", root)
        levels, num_classes = int(manifest["levels"]), len(manifest["classes"])
        channels = image_channels(manifest, x, f"datasets.{m.dataset}")
        labelled = bool(manifest.get("labelled", True))
        if not labelled and num_classes != 1:
            raise data.DataError(f"datasets.{m.dataset}: unlabelled, but its manifest names {num_classes} classes "
                                 "(an unlabelled dataset has exactly one); prepare the dataset again")
        need = x[0].size  # input tokens of one image: class + all values but the last
        if T < need:
            what = "class + pixels" if channels == 1 else (f"class + {x.shape[1]}x{x.shape[2]} pixels x {channels} "
                                                            "channels, less the last value")
            raise data.DataError(f"models.{key}.gpt.block_size: {T} is shorter than one image "
                                 f"({need} input tokens: {what}); set it to at least {need}")
        y = class_ids({"labelled": labelled}, y)
        out = ModelSpec(**spec, levels=levels, image_size=int(manifest["image_size"]), channels=channels,
                        classes=tuple(manifest["classes"]), class_prior=tuple(class_prior(y, num_classes)),
                        vocab_size=levels + num_classes).to_config()
        if not labelled:
            out["labelled"] = False
        return out
    raise data.DataError(f"datasets.{m.dataset}: kind {kind!r} is not supported by the transformer family")


def build_network(config: dict[str, Any]):
    from components.models.gpt import GPT

    return GPT(GPTConfig(**config["gpt"]), config["vocab_size"])


def training_data(key: str, m: ModelConfig, config: dict[str, Any], root: Path):
    """(get_batch(step, gen) -> (inputs (B, T), targets (B, T)), tokens per batch)."""
    import torch

    from components import data

    T, B = m.gpt.block_size, m.train.batch_size
    if config["kind"] == "text":
        tok = text_tokenizer(config, "")
        ids = torch.from_numpy(tok.encode(data.load_text(m.dataset, "train", root)))  # (N,)
        if len(ids) < T + 2:
            raise data.DataError(f"datasets.{m.dataset}: the train split has {len(ids)} characters, fewer than "
                                 f"models.{key}.gpt.block_size + 2 = {T + 2}; lower block_size or add text")
        windows = ids.unfold(0, T + 1, 1)  # (N - T, T + 1) view: every window of T + 1 characters

        def get_batch(step: int, gen: torch.Generator):
            w = windows[torch.randint(len(windows), (B,), generator=gen)]  # (B, T + 1)
            return w[:, :-1], w[:, 1:]
        return get_batch, B * T

    if config["kind"] == "pairs":
        from components.families.seq2seq import pair_tokenizer

        tok = pair_tokenizer(config["vocab"])
        pairs = data.load_pairs(m.dataset, "train", root)
        mean_target = float(np.mean([len(t) + 1 for _, t in pairs]))

        def get_pair_batch(step: int, gen: torch.Generator):
            idx = torch.randint(len(pairs), (B,), generator=gen).tolist()
            return pair_sequences(tok, [pairs[i] for i in idx])
        return get_pair_batch, max(1, round(B * mean_target))   # target tokens, as the encoder-decoder counts

    x, y = data.load_images(m.dataset, "train", root)
    seq = torch.from_numpy(image_sequences(x, class_ids(config, y), config["levels"]))  # (N, 1 + H*W*C)

    def get_image_batch(step: int, gen: torch.Generator):
        s = seq[torch.randint(len(seq), (B,), generator=gen)]  # (B, 1 + H*W*C)
        return s[:, :-1], s[:, 1:]
    return get_image_batch, B * (seq.size(1) - 1)


def pair_sequences(tok, pairs):
    """(inputs (B, L), targets (B, L)) of source + [sep] + target + [eos]; targets are -100 (not scored)
    on the source and on padding, so the loss is that of the target given the source."""
    import torch

    from components.families.seq2seq import pad

    seqs = [np.concatenate([tok.encode(s), [tok.sep_id], tok.encode(t), [tok.eos_id]]) for s, t in pairs]
    labels = [np.where(np.arange(len(q)) <= len(s), -100, q) for q, (s, _) in zip(seqs, pairs)]
    x, _ = pad([q[:-1] for q in seqs], tok.pad_id)
    y, _ = pad([lab[1:] for lab in labels], -100)
    return x, y.to(torch.long)


def loss_fn(config: dict[str, Any]):
    """Next-token cross-entropy; for images over the grey levels only (a pixel is never a class token);
    for pairs over the target tokens only (the other labels are -100)."""
    import torch.nn.functional as F

    levels = config.get("levels") if config["kind"] == "image" else None

    def loss(model, batch, gen):
        xb, yb = batch
        logits, _ = model(xb, use_cache=False)  # (B, T, V)
        if levels is not None:
            logits = logits[..., :levels]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), yb.reshape(-1), ignore_index=-100)
    return loss


def tokens_per_sequence(config: dict[str, Any]) -> int:
    """Training context: block_size for text, class token + values but the last for images (H*W*C)."""
    if config["kind"] in ("text", "pairs"):
        return config["gpt"]["block_size"]
    return config["image_size"] ** 2 * int(config.get("channels", 1))


def flops_per_item(net, config: dict[str, Any]) -> float:
    """Forward + backward FLOPs per token at the training context, counted by torch.utils.flop_counter.

    Attention runs through SDPA's math backend here so that its matmuls are counted (the CPU
    flash kernel has no FLOP formula); the full T x T products count, as in the usual 6N + 12LTC.
    Above FLOP_COUNT_MAX_TOKENS (a large colour image: 64x64x3 = 12288 tokens) the math backend's
    T x T matrices would take gigabytes, so the counts at two shorter contexts are extrapolated
    linearly (per token: the matmuls are constant and attention linear in T, so it is exact).
    """
    T = tokens_per_sequence(config)
    if T > FLOP_COUNT_MAX_TOKENS:
        half = FLOP_COUNT_MAX_TOKENS // 2
        a, b = _flops_per_token(net, half), _flops_per_token(net, FLOP_COUNT_MAX_TOKENS)
        return a + (b - a) * (T - half) / (FLOP_COUNT_MAX_TOKENS - half)
    return _flops_per_token(net, T)


def _flops_per_token(net, T: int) -> float:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.zeros(1, T, dtype=torch.long, device=base.device_of(net))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        logits, _ = net(idx, use_cache=False)
        logits.float().logsumexp(-1).sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / T


def probe_step(net, config: dict[str, Any], batch_size: int, gen):
    """(loss() of a next-token step on random tokens of the training context, tokens per step)."""
    import torch
    import torch.nn.functional as F

    T = tokens_per_sequence(config)
    seq = torch.randint(config["vocab_size"], (batch_size, T + 1), generator=gen, device=gen.device)  # (B, T + 1)

    def loss():
        logits, _ = net(seq[:, :-1], use_cache=False)                        # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), seq[:, 1:].reshape(-1))
    return loss, batch_size * T


def load_model(key: str, root: Path):
    """(GPT in eval mode with the trained weights, its model spec) from models/<key>/model.pt."""
    return base.load_model(key, root, ModelNotTrainedError, ("gpt",))


train = base.train   # the one training entry (components/families/base.py)


# ---------------------------------------------------------------------------
# Sampling (also used by `genflow sample`)
# ---------------------------------------------------------------------------

def sample_text(model, config: dict, prompt: str, length: int, *, num_samples: int = 1,
                temperature: float = 1.0, top_k: int = 0, seed: int = 0, use_cache: bool = True) -> list[str]:
    """``num_samples`` continuations of ``length`` characters after ``prompt`` (prompt included).

    The prompt must use the model's vocabulary (UnknownCharactersError names the others) and fit
    its context (ContextLengthError). An empty prompt starts from a blank line, the separator
    between documents.
    """
    import torch

    from components.tokenizer import CharTokenizer

    tok = CharTokenizer(config["vocab"])
    start = prompt or ("\n" if "\n" in tok.stoi else tok.vocab[0])
    ids = torch.from_numpy(tok.encode(start, strict=True))[None].repeat(num_samples, 1)  # (S, P)
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(ids, length, temperature=temperature, top_k=top_k or None,
                         use_cache=use_cache, generator=gen)
    texts = [tok.decode(row) for row in out]
    return texts if prompt else [t[len(start):] for t in texts]


def sample_images(model, config: dict, labels: np.ndarray, *, temperature: float = 1.0, top_k: int = 0,
                  seed: int = 0, use_cache: bool = True, batch_size: int = 512,
                  prefix: Optional[np.ndarray] = None) -> np.ndarray:
    """Class-conditional images, one per label: (N, H, W) float32 in [0, 1] for grey, (N, H, W, C)
    for colour (unlabelled data: every label is 0, the one class).

    prefix (N, P) levels: the first P tokens of each image (components.tokenizer.image_tokens: raster
    order, a pixel's channels consecutive), kept as given (a completion of the image's top); None:
    the whole image is drawn.
    """
    import torch

    from components.tokenizer import image_token_count, tokens_to_images

    levels, size, channels = config["levels"], config["image_size"], int(config.get("channels", 1))
    D = image_token_count(size, channels)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= config["num_classes"]):
        raise ModelError(f"labels: must be class indices 0..{config['num_classes'] - 1}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    batch_size = image_batch(batch_size, config)
    for i in range(0, len(labels), batch_size):
        start = torch.from_numpy(levels + labels[i:i + batch_size])[:, None]  # (b, 1) class tokens
        if prefix is not None:                                                # (b, 1 + P)
            start = torch.cat([start, torch.from_numpy(np.asarray(prefix[i:i + batch_size], dtype=np.int64))], 1)
        seq = model.generate(start, D + 1 - start.shape[1], temperature=temperature, top_k=top_k or None,
                             use_cache=use_cache, generator=gen, allowed_tokens=levels)
        out.append(seq[:, 1:].numpy())
    tokens = np.concatenate(out) if out else np.zeros((0, D), dtype=np.int64)
    return (tokens_to_images(tokens, size, channels) / (levels - 1)).astype(np.float32)


def complete_prefix(model, config: dict, levels: np.ndarray, keep: np.ndarray, **kw) -> np.ndarray:
    """Completions in [0, 1] of images of levels (N, H, W) grey or (N, H, W, C) colour whose keep mask
    (N, H, W), one value per pixel, holds the first P pixels in raster order; a kept pixel keeps all
    its channels. Returns the images' layout. The class token comes first in the model's sequence,
    so the class is the one under which the model finds the kept prefix most likely
    (log p(c) + log p(prefix | c))."""
    from components.evaluation.editing import raster_prefix_length

    levels, keep = np.asarray(levels), np.asarray(keep, dtype=bool)
    channels = int(config.get("channels", 1))
    want = (config["image_size"],) * 2 + (() if channels == 1 else (channels,))
    if levels.shape[1:] != want:
        raise ModelError(f"inpainting: images of shape {levels.shape[1:]}, the model takes {want}")
    if keep.shape != levels.shape[:3]:
        raise ModelError(f"inpainting: mask of shape {keep.shape}, expected one value per pixel {levels.shape[:3]}")
    p = raster_prefix_length(keep)
    if p < 0:
        raise ModelError("inpainting: an autoregressive model completes only the pixels after a prefix in "
                         "raster order (e.g. the bottom rows); this mask keeps later pixels")
    prefix = levels.reshape(len(levels), -1)[:, :p * channels].astype(np.int64)     # (N, P*C) tokens
    joint = image_log_likelihoods(model, config, prefix) + np.log(config["class_prior"])[None, :]
    return sample_images(model, config, joint.argmax(1), prefix=prefix, **kw)


# ---------------------------------------------------------------------------
# Likelihood of images
# ---------------------------------------------------------------------------

def image_log_likelihoods(model, config: dict, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, K) log p(x_n | class c) in nats over the K classes, every value (pixel or channel of a pixel)
    over the levels only; x is images (N, H, W[, C]) or their first tokens (N, P)."""
    import torch
    import torch.nn.functional as F

    levels, C = config["levels"], config["num_classes"]
    n = len(x)
    out = np.zeros((n, C))
    batch_size = image_batch(batch_size, config)
    with torch.no_grad():
        for c in range(C):
            seq = torch.from_numpy(image_sequences(x, np.full(n, c), levels))  # (N, 1 + D)
            for i in range(0, n, batch_size):
                s = seq[i:i + batch_size]
                logits, _ = model(s[:, :-1], use_cache=False)            # (b, D, V)
                logp = F.log_softmax(logits[..., :levels], dim=-1)         # (b, D, levels)
                out[i:i + len(s), c] = logp.gather(-1, s[:, 1:, None]).sum((1, 2)).numpy()
    return out


def image_bits_per_dim(log_lik: np.ndarray, prior: np.ndarray, y: np.ndarray, dims: int) -> dict[str, float]:
    """eval/bits_per_dim (p(x) = sum_c p(c) p(x|c), exact) and eval/bits_per_dim_conditional (p(x|y))."""
    joint = log_lik + np.log(prior)[None, :]                   # (N, C) log p(c) + log p(x|c)
    mx = joint.max(1, keepdims=True)
    log_px = (mx[:, 0] + np.log(np.exp(joint - mx).sum(1)))     # logsumexp over classes
    cond = log_lik[np.arange(len(y)), y]
    scale = -1.0 / (dims * math.log(2))
    return {"eval/bits_per_dim": float(log_px.mean() * scale),
            "eval/bits_per_dim_conditional": float(cond.mean() * scale)}


def pixel_baselines(x_train: np.ndarray, x_test: np.ndarray, levels: int, *, alpha: float = 0.5,
                    C: float = 1.0, iters: int = 100) -> dict[str, float]:
    """Bits per dimension of three pixel models fitted on train, scored on test (unconditional).

    A dimension is one value: a pixel of a grey image, one channel of a pixel of a colour one (the
    model's token order). uniform: log2(levels). indep: one categorical per dimension (add-alpha smoothing).
    logreg: one multinomial logistic regression per pixel over the previous pixels (raster
    order, grey values scaled to [0, 1]), L2 penalty as scikit-learn's C. The D regressions
    share no parameters, so they are fitted at once as one masked linear layer with L-BFGS
    (a second or two; 64 separate scikit-learn fits took minutes on a busy 2-core machine). Its
    weights grow as D^2: above LOGREG_MAX_DIMS dimensions (e.g. colour 16x16) it is not fitted and
    its metric is absent.
    """
    import torch
    import torch.nn.functional as F

    a = x_train.reshape(len(x_train), -1).astype(np.int64)   # (N, D)
    b = x_test.reshape(len(x_test), -1).astype(np.int64)     # (M, D)
    N, D = a.shape
    counts = np.stack([np.bincount(a[:, j], minlength=levels) for j in range(D)]).astype(np.float64)  # (D, L)
    indep = (counts + alpha) / (counts.sum(1, keepdims=True) + alpha * levels)  # (D, L)
    p_indep = indep[np.arange(D)[None, :], b]                                   # (M, D)
    bits = lambda q: float(-np.log2(q).mean())  # noqa: E731
    if D > LOGREG_MAX_DIMS:
        return {"baseline/uniform_bits_per_dim": math.log2(levels), "baseline/indep_bits_per_dim": bits(p_indep)}

    xa, xb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    mask = torch.tril(torch.ones(D, D, dtype=torch.float32), diagonal=-1)       # (D_out, D_in): previous pixels only
    W = torch.zeros(D, D, levels, dtype=torch.float32, requires_grad=True)      # (D_out, D_in, L)
    bias = torch.log(torch.from_numpy(indep)).float().requires_grad_(True)     # (D_out, L), start at indep

    def logits(x):                                                             # (n, D) -> (n, D_out, L)
        return torch.einsum("ni,oil->nol", x / (levels - 1), W * mask[:, :, None]) + bias

    opt = torch.optim.LBFGS([W, bias], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = F.cross_entropy(logits(xa).reshape(-1, levels), ta.reshape(-1), reduction="sum")
        loss = (nll + 0.5 / C * (W * mask[:, :, None]).pow(2).sum()) / N
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        p = F.softmax(logits(xb), -1).gather(-1, tb[..., None])[..., 0].numpy()  # (M, D)
    p_lr = 0.99 * p + 0.01 * p_indep  # a level never seen at a pixel keeps a non-zero probability
    return {"baseline/uniform_bits_per_dim": math.log2(levels),
            "baseline/indep_bits_per_dim": bits(p_indep),
            "baseline/logreg_bits_per_dim": bits(p_lr)}


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def evaluate(key: str, params: Params, root: Path) -> dict:
    """Score model ``key`` on its test split; write reports/<key>/metrics.json and samples."""
    root = Path(root)
    m = params.model(key)
    check(key, m)
    from components.training import set_threads

    set_threads(m.train.threads)
    model, config = load_model(key, root)
    if config["kind"] == "text":
        metrics, details = _evaluate_text(key, m, model, config, root)
    elif config["kind"] == "pairs":
        metrics, details = _evaluate_pairs(key, m, model, config, root)
    else:
        metrics, details = _evaluate_images(key, m, model, config, root)
    out = Layout(root).report_dir(key)
    write_json(out / "metrics.json", metrics)
    write_json(out / "details.json", details)
    return metrics


def _evaluate_text(key: str, m: ModelConfig, model, config: dict, root: Path) -> tuple[dict, dict]:
    import torch

    from components import data
    from components.evaluation.text import model_bits_per_char, ngram_baselines, sliding_stride
    from components.resources import peak_rss
    from components.tokenizer import CharTokenizer

    tok = CharTokenizer(config["vocab"])
    train_text = data.load_text(m.dataset, "train", root)
    test_text = data.load_text(m.dataset, "test", root)
    unknown = tok.unknown_chars(test_text)
    test_ids = tok.encode(test_text)
    block = config["gpt"]["block_size"]
    stride = sliding_stride(block)

    metrics: dict[str, float] = {}
    t = time.perf_counter()
    metrics["eval/bits_per_char"] = model_bits_per_char(model, test_ids, block, stride=stride)
    metrics["perf/eval_seconds"] = time.perf_counter() - t
    metrics["eval/unknown_chars"] = float(sum(unknown.values()))
    metrics.update(ngram_baselines(tok.encode(train_text), test_ids, tok.vocab_size, m.eval.ngram_orders))

    s = m.sample
    kw = dict(temperature=s.temperature, top_k=s.top_k, seed=m.train.seed)
    with peak_rss() as mem:  # resident memory while sampling (perf/peak_rss_sample_mb)
        texts = sample_text(model, config, s.prompt, s.length, num_samples=max(1, m.eval.text_samples), **kw)
    metrics["perf/peak_rss_sample_mb"] = mem.peak_mb
    metrics["perf/peak_rss_sample_delta_mb"] = mem.delta_mb
    body = "".join(f"=== sample {i + 1} (temperature {s.temperature}, top_k {s.top_k}, prompt {s.prompt!r}) ===\n"
                   f"{t}\n\n" for i, t in enumerate(texts))
    write_text(Layout(root).report_dir(key) / "samples.txt", body)

    # Sampling speed: one sequence of `length` new characters, with and without the KV cache.
    with torch.no_grad():
        sample_text(model, config, s.prompt, 8, **kw)  # warm-up
        cached = median_seconds(lambda: sample_text(model, config, s.prompt, s.length, **kw))
        nocache = median_seconds(lambda: sample_text(model, config, s.prompt, s.length, use_cache=False, **kw))
    metrics["perf/sample_ms_per_token_cached"] = cached * 1e3 / s.length
    metrics["perf/sample_ms_per_token_nocache"] = nocache * 1e3 / s.length
    metrics["perf/sample_ms_per_item"] = metrics["perf/sample_ms_per_token_cached"]
    details = {"unknown_test_chars": unknown, "bits_per_char_stride": stride, "test_chars": len(test_text),
               "kv_cache_speedup": nocache / cached if cached > 0 else None}
    return metrics, details


def transduce_pairs(model, config: dict, sources: list[str], *, greedy: bool = True, temperature: float = 1.0,
                    top_k: int = 0, seed: int = 0, use_cache: bool = True, strict: bool = True) -> list[str]:
    """Targets the GPT writes after source + [sep], up to its end marker; prompts of one length go together."""
    import torch

    from components.families.seq2seq import Seq2SeqError, pair_tokenizer

    tok = pair_tokenizer(config["vocab"])
    block = config["gpt"]["block_size"]
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for s in sources:
        if not s:
            raise Seq2SeqError("source: empty; give the text to transduce")
        ids = np.append(tok.encode(s, strict=strict), tok.sep_id)
        if len(ids) >= block:
            raise ModelError(f"source: {len(s)} characters; with the separator it fills the context "
                             f"gpt.block_size={block}; shorten it")
        prompts.append(ids)
    out: list[str] = [""] * len(sources)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for P, rows in sorted(by_length.items()):
        idx = torch.from_numpy(np.stack([prompts[i] for i in rows]))
        new = _decode_until_end(model, idx, block - P, tok, greedy, temperature, top_k, gen, use_cache)
        for i, row in zip(rows, new):
            out[i] = tok.decode_target(row)
    return out


def _decode_until_end(model, idx, max_new: int, tok, greedy: bool, temperature: float, top_k: int, gen,
                      use_cache: bool) -> list[list[int]]:
    """New ids after the prompts idx (B, P), stopping once every row has written the end marker
    (GPT.generate always writes max_new tokens). With the cache: components.models.gpt.Decoder."""
    import torch

    from components.models.gpt import Decoder, pick_next

    B, P = idx.shape
    done = torch.zeros(B, dtype=torch.bool)
    seq = idx
    with torch.inference_mode():
        decoder = Decoder(model, B) if use_cache else None
        logits = decoder(idx, 0) if use_cache else model(idx, use_cache=False)[0][:, -1]
        for step in range(max_new):
            logits = logits[:, :tok.allowed_tokens]
            nxt = pick_next(logits, greedy, temperature, top_k, gen)
            nxt = torch.where(done, torch.full_like(nxt, tok.eos_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == tok.eos_id
            if bool(done.all()) or step == max_new - 1:
                break
            logits = decoder(nxt[:, None], P + step) if use_cache else model(seq, use_cache=False)[0][:, -1]
    return seq[:, P:].tolist()


def pairs_nll(model, config: dict, pairs: list[tuple[str, str]], batch_size: int = 64) -> tuple[float, int]:
    """(summed nats, target tokens) of targets + end markers given source + [sep]."""
    import torch
    import torch.nn.functional as F

    from components.families.seq2seq import pair_tokenizer

    tok = pair_tokenizer(config["vocab"])
    nats, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            x, y = pair_sequences(tok, pairs[i:i + batch_size])
            logits, _ = model(x, use_cache=False)
            nats += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                                          reduction="sum"))
            n += int((y != -100).sum())
    return nats, n


def _evaluate_pairs(key: str, m: ModelConfig, model, config: dict, root: Path) -> tuple[dict, dict]:
    """The seq2seq family's metrics (same names), with the GPT's decoding."""
    import torch

    from components.families.seq2seq import evaluate_pairs, ms_per_char

    s = m.sample
    kw = dict(greedy=s.decoding != "sample", temperature=s.temperature, top_k=s.top_k, seed=m.train.seed,
              strict=False)
    metrics, details = evaluate_pairs(key, m, config, root,
                                      lambda sources: transduce_pairs(model, config, sources, **kw),
                                      lambda pairs: pairs_nll(model, config, pairs))
    if s.decoding == "beam":
        details["decoding"] = "greedy (the GPT has no beam search; sample.decoding beam asked)"
    sources = [src for src, _ in details.pop("speed_pairs")]
    with torch.no_grad():   # timed as the encoder-decoder's figures: one source at a time, side by side
        chars = sum(len(t) + 1 for t in transduce_pairs(model, config, sources, strict=False))
        ms = ms_per_char({name: (lambda src, c=c: transduce_pairs(model, config, [src], use_cache=c, strict=False))
                          for name, c in (("cached", True), ("nocache", False))}, sources, chars)
    metrics["perf/decode_ms_per_char_cached"] = ms["cached"]
    metrics["perf/decode_ms_per_char_nocache"] = ms["nocache"]
    metrics["perf/sample_ms_per_item"] = metrics["perf/decode_ms_per_char_cached"]
    details["cache_speedup"] = ms["nocache"] / ms["cached"] if ms["cached"] > 0 else None
    return metrics, details


def _evaluate_images(key: str, m: ModelConfig, model, config: dict, root: Path) -> tuple[dict, dict]:
    import torch

    from components import data
    from components.evaluation.images import cycling_labels, image_baselines, image_metrics, save_grid
    from components.resources import peak_rss

    levels, C = config["levels"], config["num_classes"]
    x_train, _ = data.load_images(m.dataset, "train", root)
    x_test, y_test = data.load_images(m.dataset, "test", root)
    y_test = class_ids(config, y_test)          # unlabelled: the one class
    dims = int(np.prod(x_test.shape[1:]))       # H*W*C: bits per dimension divide by every value

    metrics: dict[str, float] = {}
    t = time.perf_counter()
    log_lik = image_log_likelihoods(model, config, x_test)  # (N, C)
    metrics.update(image_bits_per_dim(log_lik, np.asarray(config["class_prior"]), y_test, dims))
    metrics["perf/eval_seconds"] = time.perf_counter() - t
    metrics.update(pixel_baselines(x_train, x_test, levels))

    n = m.eval.num_samples
    labels = cycling_labels(n, C)
    s = m.sample
    kw = dict(temperature=s.temperature, top_k=s.top_k, seed=m.train.seed)
    with torch.no_grad():
        t = time.perf_counter()
        with peak_rss() as mem:  # resident memory while sampling (perf/peak_rss_sample_mb)
            samples = sample_images(model, config, labels, **kw)
        metrics["perf/sample_ms_per_item"] = (time.perf_counter() - t) * 1e3 / max(n, 1)
        metrics["perf/peak_rss_sample_mb"] = mem.peak_mb
        metrics["perf/peak_rss_sample_delta_mb"] = mem.delta_mb
        if samples[0].size <= NOCACHE_MAX_TOKENS:   # O(T^2) without a cache: minutes at 32x32x3 (resources.py)
            t = time.perf_counter()
            sample_images(model, config, labels[:max(C, n // 4)], use_cache=False, **kw)
            metrics["perf/sample_ms_per_item_nocache"] = (time.perf_counter() - t) * 1e3 / max(C, n // 4)
    metrics.update(image_metrics(samples, labels, m.dataset, root))
    metrics.update(image_baselines(m.dataset, root, n, seed=0))  # the same baselines as digits-unet
    if m.eval.inpaint_samples:  # the bottom half only: a raster-order model cannot condition on later pixels
        from components.evaluation.editing import inpaint_evaluation

        metrics.update(inpaint_evaluation(lambda lv, keep: complete_prefix(model, config, lv, keep, **kw),
                                          m.dataset, root, m.eval.inpaint_samples, masks=("bottom",)))

    # Grid: one row per class, the first 10 samples drawn for it.
    rows = [samples[labels == c][:10] for c in range(C)]
    per_row = min(len(r) for r in rows)
    save_grid(np.concatenate([r[:per_row] for r in rows]), Layout(root).report_dir(key) / "samples.png", nrow=per_row)
    return metrics, {"num_samples": n, "dims": dims, "class_prior": config["class_prior"]}
