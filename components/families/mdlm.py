"""Masked diffusion language models (backbone ``mdlm``): train, evaluate and load one.

    metrics = train("pydoc-mdlm", params, root)      # models/pydoc-mdlm/model.pt + train_metrics.json
    metrics = evaluate("pydoc-mdlm", params, root)   # reports/pydoc-mdlm/metrics.json, samples.txt, sampling.*
    net, config = load_model("pydoc-mdlm", root)     # network with weights + its config dict (ONNX export)

The model (components.models.mdlm) is a bidirectional transformer over the characters of a text
dataset plus one [MASK] id, trained on the continuous-time ELBO of the absorbing process. Its
shape is the model's ``gpt`` section of params.yaml (n_layer, n_head, n_embd, block_size) plus
``masked.conv_kernel`` (its local input convolution); ``masked.estimator`` picks how the loss
draws the ELBO (``count``, or ``time`` with smallest mask rate ``masked.eps``); ``sample.steps`` is
K, the number of parallel denoising steps.

Evaluation, next to pydoc-gpt's numbers on the same split:
- eval/bits_per_char: an upper bound (the ELBO, see MaskedDiffusion.bits_per_char_bound) on the
  test split, cut into block_size windows, with ELBO_DRAWS draws (masked counts) per window from a fixed
  seed; eval/bits_per_char_is_upper_bound = 1 says so, eval/bits_per_char_stderr is its spread.
  Every window starts from nothing, so its first characters have little context; pydoc-gpt's
  bits/char give each character at least 3/4 of a window of text before it.
- eval/bits_per_char_sliding: the same bound with pydoc-gpt's context (windows every block_size // 4
  characters, components.evaluation.text.sliding_stride, each scoring its new characters with the
  text before them visible): a bound on the model writing a long text a segment at a time, the
  like-for-like number.
- baseline/ngram{n}_bits_per_char: interpolated Kneser-Ney models fitted on train (as pydoc-gpt).
- the K sweep: for each K (``eval.sampler_sweep`` names ``k8``, ``k32`` ...; default 8, 32, 128),
  perf/sample_ms_per_item_k{K} (ms per generated character, one sequence of sample.length, the
  way pydoc-gpt's perf/sample_ms_per_item is taken) and eval/sample_ngram_bpc_k{K}: bits per
  character of ``eval.text_samples`` unprompted samples under the order-SAMPLE_NGRAM_ORDER n-gram
  model fitted on train, a quality proxy (lower = more like the training text; degenerate,
  repetitive text can also score low, so read it with the samples). baseline/real_sample_ngram_bpc
  is the same number for real test windows of the same length.
"""
from __future__ import annotations

import dataclasses
import math
import re
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

ELBO_DRAWS = 8                  # draws of the masked count per test window for the bound (fixed seed)
ELBO_SEED = 0
DEFAULT_K_SWEEP = (8, 32, 128)  # used when eval.sampler_sweep names no kN entries
SAMPLE_NGRAM_ORDER = 4          # the n-gram model that scores samples (quality proxy)


class MaskedLMFamilyError(ModelError):
    """A masked diffusion language model cannot be trained, evaluated or loaded as asked; one line."""


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def k_sweep(m: ModelConfig) -> list[int]:
    """The K values of the speed/quality sweep: eval.sampler_sweep entries kN, else DEFAULT_K_SWEEP.

    Other names (ddim10, the diffusion family's samplers, e.g. from --quick) do not apply here.
    """
    from components.models.mdlm import check_steps

    ks = [int(g.group(1)) for g in (re.fullmatch(r"k(\d+)", n.strip().lower()) for n in m.eval.sampler_sweep) if g]
    for k in ks:
        try:
            check_steps(k)
        except ValueError:
            raise MaskedLMFamilyError(f"eval.sampler_sweep: k{k}: K must be at least 1") from None
    return sorted(set(ks)) or list(DEFAULT_K_SWEEP)


def check_settings(key: str, m: ModelConfig) -> None:
    """Refuse bad settings in one line before any training or sampling."""
    from components.models.mdlm import check_conv_kernel, check_eps, check_estimator, check_steps

    if m.backbone != "mdlm":
        raise MaskedLMFamilyError(f"models.{key}.backbone: {m.backbone!r} is not a masked diffusion "
                                  "language model (mdlm)")
    check_eps(m.masked.eps)
    check_estimator(m.masked.estimator)
    check_conv_kernel(m.masked.conv_kernel)
    check_steps(m.sample.steps)
    k_sweep(m)
    if not (m.sample.temperature > 0 and math.isfinite(m.sample.temperature)):
        raise MaskedLMFamilyError(f"models.{key}.sample.temperature: must be > 0, got {m.sample.temperature}")
    if m.sample.length < 1:
        raise MaskedLMFamilyError(f"models.{key}.sample.length: must be at least 1, got {m.sample.length}")
    if len(m.sample.prompt) + m.sample.length > m.gpt.block_size:
        raise MaskedLMFamilyError(
            f"models.{key}.sample.length: the prompt ({len(m.sample.prompt)} characters) plus {m.sample.length} "
            f"generated ones exceed gpt.block_size={m.gpt.block_size}; a masked model writes the whole "
            "sequence at once, so lower sample.length or raise block_size")


def _tokenizer(manifest: dict, train_text: str):
    from components.tokenizer import CharTokenizer

    return CharTokenizer(manifest.get("vocab") or "".join(sorted(set(train_text))))


# ---------------------------------------------------------------------------
# The Family contract (components/families/base.py): spec, network, batches, loss, cost
# ---------------------------------------------------------------------------

check = check_settings


def model_config(key: str, m: ModelConfig, manifest: dict, root: Path) -> dict[str, Any]:
    """The model spec: the network's shape, the process settings and the vocabulary (+ [MASK])."""
    from components import data

    if manifest.get("kind") != "text":
        raise MaskedLMFamilyError(f"models.{key}.dataset: {m.dataset} holds {manifest.get('kind')}, "
                                  "a masked diffusion language model needs text")
    tok = _tokenizer(manifest, data.load_text(m.dataset, "train", root))
    vocab_size = tok.vocab_size + 1                                            # characters, unknown, [MASK]
    return ModelSpec(model=key, backbone="mdlm", dataset=m.dataset, kind="text", network=dataclasses.asdict(m.gpt),
                     process=dataclasses.asdict(m.masked), sample=dataclasses.asdict(m.sample),
                     vocab=tok.vocab, vocab_size=vocab_size, mask_id=vocab_size - 1).to_config()


def build_network(config: dict[str, Any]):
    from components.models.mdlm import MaskedLM

    return MaskedLM(GPTConfig(**config["gpt"]), config["vocab_size"],
                    conv_kernel=config["masked"].get("conv_kernel", 0))


def _process(config: dict[str, Any]):
    from components.models.mdlm import MaskedDiffusion

    return MaskedDiffusion(config["mask_id"], config["masked"]["eps"], config["masked"].get("estimator", "count"))


def training_data(key: str, m: ModelConfig, config: dict[str, Any], root: Path):
    """(get_batch(step, gen) -> windows (B, T) of the train text, tokens per batch)."""
    import torch

    from components import data

    tok = _tokenizer(config, "")
    T, B = m.gpt.block_size, m.train.batch_size
    ids = torch.from_numpy(tok.encode(data.load_text(m.dataset, "train", root)))   # (N,)
    if len(ids) < T + 1:
        raise MaskedLMFamilyError(f"datasets.{m.dataset}: the train split has {len(ids)} characters, fewer "
                                  f"than models.{key}.gpt.block_size + 1 = {T + 1}; lower block_size or add text")
    windows = ids.unfold(0, T, 1)                                              # (N - T + 1, T) view

    def get_batch(step: int, gen: torch.Generator):
        return windows[torch.randint(len(windows), (B,), generator=gen)]       # (B, T)
    return get_batch, B * T


def loss_fn(config: dict[str, Any]):
    """The negative ELBO of the absorbing process, in nats per token (masked.estimator picks the draw)."""
    process = _process(config)

    def loss(model, batch, gen):
        return process.training_loss(model, batch, gen)
    return loss


def flops_per_item(net, config: dict[str, Any]) -> float:
    """Forward + backward FLOPs per token at length block_size (SDPA's math backend so attention counts)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    T = config["gpt"]["block_size"]
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        net(torch.zeros(1, T, dtype=torch.long, device=base.device_of(net))).logsumexp(-1).sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / T


def probe_step(net, config: dict[str, Any], batch_size: int, gen):
    """(loss() of a training step on random text windows, tokens per step)."""
    import torch

    process = _process(config)
    T = config["gpt"]["block_size"]
    seq = torch.randint(config["mask_id"], (batch_size, T), generator=gen, device=gen.device)  # (B, T), no [MASK]
    return (lambda: process.training_loss(net, seq, gen)), batch_size * T


def load_model(key: str, root: Path):
    """(MaskedLM in eval mode with the trained weights, its model spec) from models/<key>/model.pt."""
    return base.load_model(key, root, MaskedLMFamilyError, ("mdlm",))


train = base.train   # the one training entry (components/families/base.py)


# ---------------------------------------------------------------------------
# Sample and evaluate
# ---------------------------------------------------------------------------

def sample_text(net, config: dict, prompt: str, length: int, steps: int, *, num_samples: int = 1,
                temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
    """``num_samples`` texts: the prompt (kept as given) then ``length`` characters written in K = steps steps."""
    import torch

    from components.models.mdlm import MaskedDiffusion
    from components.tokenizer import CharTokenizer

    tok = CharTokenizer(config["vocab"])
    prompt_ids = torch.from_numpy(tok.encode(prompt, strict=True))
    if len(prompt_ids) + length > config["gpt"]["block_size"]:
        raise MaskedLMFamilyError(f"sample.length: the prompt ({len(prompt_ids)}) plus {length} characters exceed "
                                  f"the model's block_size={config['gpt']['block_size']}")
    process = MaskedDiffusion(config["mask_id"], config["masked"]["eps"])
    gen = torch.Generator().manual_seed(seed)
    ids = process.sample(net, num_samples, length, steps, prompt=prompt_ids, temperature=temperature,
                         top_k=top_k, generator=gen)
    return [tok.decode(row) for row in ids]


def sweep_table(rows: list[dict[str, Any]], real_bpc: float, length: int) -> str:
    lines = [f"| K | ms/char (one sequence of {length}) | sample n-gram bits/char |", "|---:|---:|---:|"]
    lines += [f"| {r['steps']} | {r['ms_per_char']:.3f} | {r['sample_ngram_bpc']:.4f} |" for r in rows]
    lines.append(f"| real test text | | {real_bpc:.4f} |")
    return "\n".join(lines) + "\n"


def evaluate(key: str, params: Params, root: Path) -> dict[str, float]:
    """Bound on bits/char, n-gram baselines, samples and the K sweep; write reports/<key>/."""
    import torch

    from components import data
    from components.evaluation.text import KneserNey, ngram_baselines, sliding_stride
    from components.models.mdlm import MaskedDiffusion

    root = Path(root)
    m = params.model(key)
    check_settings(key, m)
    ks = k_sweep(m)
    net, config = load_model(key, root)
    from components.training import set_threads

    set_threads(m.train.threads)
    tok = _tokenizer({"vocab": config["vocab"]}, "")
    train_ids = tok.encode(data.load_text(m.dataset, "train", root))
    test_text = data.load_text(m.dataset, "test", root)
    test_ids = tok.encode(test_text)
    unknown = tok.unknown_chars(test_text)
    block = config["gpt"]["block_size"]
    process = MaskedDiffusion(config["mask_id"], config["masked"]["eps"])

    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    bound, stderr = process.bits_per_char_bound(net, test_ids, block, draws=ELBO_DRAWS, seed=ELBO_SEED)
    metrics["eval/bits_per_char"] = bound
    metrics["eval/bits_per_char_is_upper_bound"] = 1.0
    metrics["eval/bits_per_char_stderr"] = stderr
    # the same bound with pydoc-gpt's context: the text before each segment visible
    stride = sliding_stride(block)
    metrics["eval/bits_per_char_sliding"], _ = process.bits_per_char_bound(net, test_ids, block, stride=stride,
                                                                          draws=ELBO_DRAWS, seed=ELBO_SEED)
    metrics["perf/eval_seconds"] = time.perf_counter() - t0
    metrics["eval/unknown_chars"] = float(sum(unknown.values()))
    metrics.update(ngram_baselines(train_ids, test_ids, tok.vocab_size, m.eval.ngram_orders))

    s = m.sample
    kw = dict(temperature=s.temperature, top_k=s.top_k, seed=m.train.seed)
    texts = sample_text(net, config, s.prompt, s.length, s.steps, num_samples=max(1, m.eval.text_samples), **kw)
    body = "".join(f"=== sample {i + 1} (K={s.steps}, temperature {s.temperature}, top_k {s.top_k}, "
                   f"prompt {s.prompt!r}) ===\n{t}\n\n" for i, t in enumerate(texts))
    write_text(Layout(root).report_dir(key) / "samples.txt", body)

    # K sweep: speed of one sequence (as pydoc-gpt is timed) and an n-gram quality proxy of samples
    lm = KneserNey(train_ids, SAMPLE_NGRAM_ORDER, tok.vocab_size)
    L, n = s.length, max(1, m.eval.text_samples)
    starts = np.linspace(0, max(len(test_ids) - L, 0), num=max(n, 16)).astype(np.int64)
    real_bpc = float(np.mean([lm.bits_per_char(test_ids[a:a + L]) for a in starts]))
    rows = []
    with torch.no_grad():
        sample_text(net, config, "", 8, 2, **kw)                               # warm-up
        for K in sorted(set(ks) | {s.steps}):
            secs = median_seconds(lambda: sample_text(net, config, "", L, K, **kw))
            free = sample_text(net, config, "", L, K, num_samples=n, **kw)
            bpc = float(np.mean([lm.bits_per_char(tok.encode(t)) for t in free]))
            rows.append({"steps": K, "ms_per_char": secs * 1e3 / L, "sample_ngram_bpc": bpc,
                         "in_sweep": K in ks})
    for r in rows:
        if r["in_sweep"]:
            metrics[f"perf/sample_ms_per_item_k{r['steps']}"] = r["ms_per_char"]
            metrics[f"eval/sample_ngram_bpc_k{r['steps']}"] = r["sample_ngram_bpc"]
        if r["steps"] == s.steps:
            metrics["perf/sample_ms_per_item"] = r["ms_per_char"]
            metrics["eval/sample_ngram_bpc"] = r["sample_ngram_bpc"]
    metrics["baseline/real_sample_ngram_bpc"] = real_bpc

    out = Layout(root).report_dir(key)
    write_json(out / "sampling.json", {"length": L, "num_samples": n, "ngram_order": SAMPLE_NGRAM_ORDER,
                                        "headline_steps": s.steps, "rows": rows, "real_sample_ngram_bpc": real_bpc})
    write_text(out / "sampling.md", f"# {key}: sampling speed and quality against K\n\n"
                                     f"{sweep_table(rows, real_bpc, L)}")
    write_json(out / "details.json", {"unknown_test_chars": unknown, "test_chars": len(test_text),
                                       "elbo_draws": ELBO_DRAWS, "elbo_seed": ELBO_SEED,
                                       "elbo": "continuous-time, count form (exact in t)",
                                       "window": block, "sliding_stride": stride})
    write_json(out / "metrics.json", metrics)
    return metrics
