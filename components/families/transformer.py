"""Transformer family: one GPT for text (next character) and for images (next pixel).

    train(key, params, root)     -> models/<key>/model.pt, train_metrics.json; returns train/ + perf/ metrics
    evaluate(key, params, root)  -> reports/<key>/metrics.json + samples; returns eval/ perf/ baseline/ metrics
    load_model(key, root)        -> (GPT with weights, its config dict), e.g. for ONNX export

The prepared dataset's manifest decides the kind:

- text: ids are characters of the train split's vocabulary (components.tokenizer), plus one
  unknown id. A batch is B random windows of block_size + 1 characters of the train text.
  Evaluation: bits per character on the test split (sliding window, see
  components.evaluation.text.model_bits_per_char), interpolated Kneser-Ney n-gram baselines on
  the same split, samples from the prompt, and sampling speed with and without the KV cache.
- image: a sequence is [class token] + the H*W pixels in raster order; a pixel is one of
  ``levels`` grey levels (ids 0..levels-1), class c is id levels + c, so images are generated
  class by class. Pixel predictions are restricted to the grey levels (class ids never count
  as pixels), in training, likelihood and sampling alike. Evaluation: exact bits per dimension,
  unconditional p(x) = sum_c p(c) p(x | c) with p(c) the train split's class shares, and
  conditional on the true class; pixel-model baselines (uniform, independent pixels, one
  logistic regression per pixel); and the shared image metrics on class-conditional samples.

model.pt = {"state_dict", "config"}; config holds "gpt" (the GPTConfig fields), "vocab_size",
"kind", "dataset", and "vocab" (text) or "levels", "num_classes", "image_size", "classes",
"class_prior" (images).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.config import GPTConfig, ModelConfig, Params
from components.errors import ModelError
from components.families import base
from components.files import write_json, write_text
from components.layout import Layout
from components.resources import median_seconds
from components.spec import ModelSpec

TEXT_EVAL_STRIDE_DIVISOR = 4  # bits/char windows start every block_size // 4 characters


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
    """(N, 1 + H*W) int64: the class token levels + y, then the pixels in raster order."""
    return np.concatenate([(levels + y.astype(np.int64))[:, None], x.reshape(len(x), -1).astype(np.int64)], axis=1)


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
    if kind == "image":
        x, y = data.load_images(m.dataset, "train", root)
        levels, num_classes = int(manifest["levels"]), len(manifest["classes"])
        need = x[0].size  # input tokens of one image: class + all pixels but the last
        if T < need:
            raise data.DataError(f"models.{key}.gpt.block_size: {T} is shorter than one image "
                                 f"({need} input tokens: class + pixels); set it to at least {need}")
        return ModelSpec(**spec, levels=levels, image_size=int(manifest["image_size"]),
                         classes=tuple(manifest["classes"]), class_prior=tuple(class_prior(y, num_classes)),
                         vocab_size=levels + num_classes).to_config()
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

    x, y = data.load_images(m.dataset, "train", root)
    seq = torch.from_numpy(image_sequences(x, y, config["levels"]))  # (N, 1 + H*W)

    def get_image_batch(step: int, gen: torch.Generator):
        s = seq[torch.randint(len(seq), (B,), generator=gen)]  # (B, 1 + H*W)
        return s[:, :-1], s[:, 1:]
    return get_image_batch, B * (seq.size(1) - 1)


def loss_fn(config: dict[str, Any]):
    """Next-token cross-entropy; for images over the grey levels only (a pixel is never a class token)."""
    import torch.nn.functional as F

    levels = config.get("levels") if config["kind"] == "image" else None

    def loss(model, batch, gen):
        xb, yb = batch
        logits, _ = model(xb, use_cache=False)  # (B, T, V)
        if levels is not None:
            logits = logits[..., :levels]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), yb.reshape(-1))
    return loss


def tokens_per_sequence(config: dict[str, Any]) -> int:
    """Training context: block_size for text, class token + pixels but the last for images."""
    return config["gpt"]["block_size"] if config["kind"] == "text" else config["image_size"] ** 2


def flops_per_item(net, config: dict[str, Any]) -> float:
    """Forward + backward FLOPs per token at the training context, counted by torch.utils.flop_counter.

    Attention runs through SDPA's math backend here so that its matmuls are counted (the CPU
    flash kernel has no FLOP formula); the full T x T products count, as in the usual 6N + 12LTC.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    T = tokens_per_sequence(config)
    idx = torch.zeros(1, T, dtype=torch.long)
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
    seq = torch.randint(config["vocab_size"], (batch_size, T + 1), generator=gen)    # (B, T + 1)

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
                  seed: int = 0, use_cache: bool = True, batch_size: int = 512) -> np.ndarray:
    """Class-conditional images, (N, H, W) float32 in [0, 1], one per label."""
    import torch

    levels, size = config["levels"], config["image_size"]
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= config["num_classes"]):
        raise ModelError(f"labels: must be class indices 0..{config['num_classes'] - 1}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(labels), batch_size):
        start = torch.from_numpy(levels + labels[i:i + batch_size])[:, None]  # (b, 1) class tokens
        seq = model.generate(start, size * size, temperature=temperature, top_k=top_k or None,
                             use_cache=use_cache, generator=gen, allowed_tokens=levels)
        out.append(seq[:, 1:].reshape(-1, size, size).numpy())
    pixels = np.concatenate(out) if out else np.zeros((0, size, size), dtype=np.int64)
    return (pixels / (levels - 1)).astype(np.float32)


# ---------------------------------------------------------------------------
# Likelihood of images
# ---------------------------------------------------------------------------

def image_log_likelihoods(model, config: dict, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, C) log p(x_n | class c) in nats, pixels over the grey levels only."""
    import torch
    import torch.nn.functional as F

    levels, C = config["levels"], config["num_classes"]
    n = len(x)
    out = np.zeros((n, C))
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

    uniform: log2(levels). indep: one categorical per pixel (add-alpha smoothing).
    logreg: one multinomial logistic regression per pixel over the previous pixels (raster
    order, grey values scaled to [0, 1]), L2 penalty as scikit-learn's C. The D regressions
    share no parameters, so they are fitted at once as one masked linear layer with L-BFGS
    (a second or two; 64 separate scikit-learn fits took minutes on a busy 2-core machine).
    """
    import torch
    import torch.nn.functional as F

    a = x_train.reshape(len(x_train), -1).astype(np.int64)   # (N, D)
    b = x_test.reshape(len(x_test), -1).astype(np.int64)     # (M, D)
    N, D = a.shape
    counts = np.stack([np.bincount(a[:, j], minlength=levels) for j in range(D)]).astype(np.float64)  # (D, L)
    indep = (counts + alpha) / (counts.sum(1, keepdims=True) + alpha * levels)  # (D, L)
    p_indep = indep[np.arange(D)[None, :], b]                                   # (M, D)

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
    bits = lambda q: float(-np.log2(q).mean())  # noqa: E731
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
    else:
        metrics, details = _evaluate_images(key, m, model, config, root)
    out = Layout(root).report_dir(key)
    write_json(out / "metrics.json", metrics)
    write_json(out / "details.json", details)
    return metrics


def _evaluate_text(key: str, m: ModelConfig, model, config: dict, root: Path) -> tuple[dict, dict]:
    import torch

    from components import data
    from components.evaluation.text import model_bits_per_char, ngram_baselines
    from components.resources import peak_rss
    from components.tokenizer import CharTokenizer

    tok = CharTokenizer(config["vocab"])
    train_text = data.load_text(m.dataset, "train", root)
    test_text = data.load_text(m.dataset, "test", root)
    unknown = tok.unknown_chars(test_text)
    test_ids = tok.encode(test_text)
    block = config["gpt"]["block_size"]
    stride = max(1, block // TEXT_EVAL_STRIDE_DIVISOR)

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


def _evaluate_images(key: str, m: ModelConfig, model, config: dict, root: Path) -> tuple[dict, dict]:
    import torch

    from components import data
    from components.evaluation.images import cycling_labels, image_baselines, image_metrics, save_grid
    from components.resources import peak_rss

    levels, C = config["levels"], config["num_classes"]
    x_train, _ = data.load_images(m.dataset, "train", root)
    x_test, y_test = data.load_images(m.dataset, "test", root)
    dims = int(np.prod(x_test.shape[1:]))

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
        t = time.perf_counter()
        sample_images(model, config, labels[:max(C, n // 4)], use_cache=False, **kw)
        metrics["perf/sample_ms_per_item_nocache"] = (time.perf_counter() - t) * 1e3 / max(C, n // 4)
    metrics.update(image_metrics(samples, labels, m.dataset, root))
    metrics.update(image_baselines(m.dataset, root, n, seed=0))  # the same baselines as digits-unet

    # Grid: one row per class, the first 10 samples drawn for it.
    rows = [samples[labels == c][:10] for c in range(C)]
    per_row = min(len(r) for r in rows)
    save_grid(np.concatenate([r[:per_row] for r in rows]), Layout(root).report_dir(key) / "samples.png", nrow=per_row)
    return metrics, {"num_samples": n, "dims": dims, "class_prior": config["class_prior"]}
