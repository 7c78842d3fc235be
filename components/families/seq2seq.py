"""Sequence-to-sequence family: the encoder-decoder transformer (backbone ``encdec``) on pairs data.

    train(key, params, root)     -> models/<key>/model.pt, train_metrics.json (components.families.base.train)
    evaluate(key, params, root)  -> reports/<key>/metrics.json, samples.txt; eval/ perf/ baseline/ metrics
    load_model(key, root)        -> (EncDec with weights, its model spec), e.g. for ONNX export

Tokens are characters of the train split's sources and targets plus markers
(components.tokenizer.PairTokenizer): the encoder reads the source's characters; the decoder reads
[bos] + target and predicts target + [eos]; the loss is the cross-entropy of those target tokens
given the source (padding ignored). A batch is B random training pairs, padded to the longest.

Evaluation (components/evaluation/seq2seq.py has the metric definitions, shared with the GPT
trained on the same pairs, transformer.py): eval/bits_per_char of the test targets given their
sources; eval/chrf, eval/bleu, eval/exact_match of decoded targets (sample.decoding: greedy,
sample or beam with sample.beam_width) for the first eval.num_samples test pairs; the retrieval
and target n-gram baselines; perf/decode_ms_per_char_{cached,no_cross_cache,nocache}: greedy
decoding of a few test sources one at a time with both caches, with the self-attention cache but
the encoder and cross-attention keys/values recomputed every step, and recomputing everything, the
three timed side by side (decode_speed).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from components.config import EncDecConfig, ModelConfig, Params
from components.errors import ModelError
from components.families import base
from components.files import write_json, write_text
from components.layout import Layout
from components.resources import interleaved_seconds
from components.spec import ModelSpec

SPEED_SOURCES = 4          # test sources decoded one at a time for the perf/ decode figures
SPEED_REPEATS = 7          # rounds of the three decodings, in turn; each one's median
SAMPLES_SHOWN = 40         # decoded test pairs written to reports/<key>/samples.txt
EVAL_BATCH = 64


class Seq2SeqError(ModelError):
    """A sequence-to-sequence model cannot be trained, evaluated or sampled as asked; one line."""


class ModelNotTrainedError(Seq2SeqError):
    """models/<key>/model.pt is missing or does not hold an encoder-decoder model."""


# ---------------------------------------------------------------------------
# Pairs as token tensors (shared with the GPT on pairs, components/families/transformer.py)
# ---------------------------------------------------------------------------

def pair_tokenizer(vocab: str):
    from components.tokenizer import PairTokenizer

    return PairTokenizer(vocab)


def source_ids(tok, source: str, limit: int, truncate: bool, *, strict: bool = False) -> np.ndarray:
    """The source's ids; one that is longer than `limit` is refused with the limit, or cut when `truncate`."""
    from components.models.gpt import ContextLengthError

    if not source:
        raise Seq2SeqError("source: empty; give the text to transduce")
    ids = tok.encode(source, strict=strict)
    if len(ids) > limit:
        if not truncate:
            raise ContextLengthError(f"source: {len(ids)} characters, longer than the encoder's context "
                                     f"{limit} (encdec.source_len); shorten it or set encdec.truncate_source")
        ids = ids[:limit]
    return ids


def pad(rows: Sequence[np.ndarray], value: int):
    """(B, max len) int64 tensor of the rows padded with `value`, and its (B, max len) bool mask of real ids."""
    import torch

    T = max(len(r) for r in rows)
    out = np.full((len(rows), T), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    t = torch.from_numpy(out)
    lengths = torch.tensor([len(r) for r in rows])
    return t, torch.arange(T)[None, :] < lengths[:, None]


def pair_tensors(tok, pairs: Sequence[tuple[str, str]], source_len: int, truncate: bool):
    """(src (B, S), src_mask (B, S), tgt_in (B, T) = [bos] + target, tgt_out (B, T) = target + [eos],
    padding -100 in tgt_out) for a batch of pairs."""
    src, src_mask = pad([source_ids(tok, s, source_len, truncate) for s, _ in pairs], tok.pad_id)
    tgt = [tok.encode(t) for _, t in pairs]
    tgt_in, _ = pad([np.insert(t, 0, tok.bos_id) for t in tgt], tok.pad_id)
    tgt_out, _ = pad([np.append(t, tok.eos_id) for t in tgt], -100)
    return src, src_mask, tgt_in, tgt_out


# ---------------------------------------------------------------------------
# The Family contract (components/families/base.py)
# ---------------------------------------------------------------------------

def check(key: str, m: ModelConfig) -> None:
    if m.backbone != "encdec":
        raise Seq2SeqError(f"models.{key}.backbone: {m.backbone!r} is not a sequence-to-sequence backbone (encdec)")
    c = m.encdec
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
        raise Seq2SeqError(f"models.{key}.encdec.n_embd: {c.n_embd} must be n_head ({c.n_head}) x an even head size")
    if c.source_len < 1 or c.target_len < 2:
        raise Seq2SeqError(f"models.{key}.encdec: source_len must be >= 1 and target_len >= 2")
    check_decoding(key, m)


def check_decoding(key: str, m: ModelConfig) -> None:
    """sample.beam_width >= 1, temperature > 0 (both families on pairs)."""
    if m.sample.beam_width < 1:
        raise Seq2SeqError(f"models.{key}.sample.beam_width: must be >= 1 (1 is greedy), got {m.sample.beam_width}")
    if not m.sample.temperature > 0:
        raise Seq2SeqError(f"models.{key}.sample.temperature: must be > 0, got {m.sample.temperature}")


def decoding_defaults(m: ModelConfig) -> dict[str, Any]:
    s = m.sample
    return {"decoding": s.decoding, "beam_width": s.beam_width, "temperature": s.temperature, "top_k": s.top_k}


def model_config(key: str, m: ModelConfig, manifest: dict, root: Path) -> dict[str, Any]:
    """The model spec: the encoder-decoder's shape, the vocabulary and the decoding defaults."""
    if manifest.get("kind") != "pairs":
        raise Seq2SeqError(f"models.{key}.dataset: {m.dataset} holds {manifest.get('kind')} data; "
                           "an encdec model needs pairs")
    c = m.encdec
    if manifest["max_source_chars"] > c.source_len and not c.truncate_source:
        raise Seq2SeqError(f"models.{key}.encdec.source_len: {c.source_len}, but {m.dataset} has sources of up to "
                           f"{manifest['max_source_chars']} characters; raise it, lower "
                           f"datasets.{m.dataset}.pair_validation.max_source_chars, or set encdec.truncate_source")
    if manifest["max_target_chars"] + 1 > c.target_len:
        raise Seq2SeqError(f"models.{key}.encdec.target_len: {c.target_len}, but {m.dataset} has targets of up to "
                           f"{manifest['max_target_chars']} characters (+1 end marker); raise it")
    tok = pair_tokenizer(manifest["vocab"])
    return ModelSpec(model=key, backbone="encdec", dataset=m.dataset, kind="pairs", network=dataclasses.asdict(c),
                     sample=decoding_defaults(m), vocab=tok.vocab, vocab_size=tok.vocab_size).to_config()


def build_network(config: dict[str, Any]):
    from components.models.encdec import EncDec

    return EncDec(EncDecConfig(**config["encdec"]), config["vocab_size"])


def training_data(key: str, m: ModelConfig, config: dict[str, Any], root: Path):
    """(get_batch(step, gen) -> (src, src_mask, tgt_in, tgt_out), target tokens per batch (mean))."""
    import torch

    from components import data

    tok = pair_tokenizer(config["vocab"])
    c = EncDecConfig(**config["encdec"])
    pairs = data.load_pairs(m.dataset, "train", root)
    B = m.train.batch_size
    mean_target = float(np.mean([len(t) + 1 for _, t in pairs]))

    def get_batch(step: int, gen: torch.Generator):
        idx = torch.randint(len(pairs), (B,), generator=gen).tolist()
        return pair_tensors(tok, [pairs[i] for i in idx], c.source_len, c.truncate_source)
    return get_batch, max(1, round(B * mean_target))


def loss_fn(config: dict[str, Any]):
    """Cross-entropy of the target tokens (characters + end marker) given the source."""
    import torch.nn.functional as F

    def loss(model, batch, gen):
        src, src_mask, tgt_in, tgt_out = batch
        logits = model(src, tgt_in, src_mask)    # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=-100)
    return loss


def flops_per_item(net, config: dict[str, Any]) -> float:
    """Forward + backward FLOPs per target token at the full context (source_len, target_len)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    c = config["encdec"]
    src = torch.zeros(1, c["source_len"], dtype=torch.long, device=base.device_of(net))
    tgt = torch.zeros(1, c["target_len"], dtype=torch.long, device=src.device)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        net(src, tgt).float().logsumexp(-1).sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / c["target_len"]


def probe_step(net, config: dict[str, Any], batch_size: int, gen):
    """(loss() of a training step on random full-length pairs, target tokens per step)."""
    import torch
    import torch.nn.functional as F

    c, V = config["encdec"], config["vocab_size"]
    src = torch.randint(V, (batch_size, c["source_len"]), generator=gen, device=gen.device)
    tgt = torch.randint(V, (batch_size, c["target_len"] + 1), generator=gen, device=gen.device)

    def loss():
        logits = net(src, tgt[:, :-1])
        return F.cross_entropy(logits.reshape(-1, V), tgt[:, 1:].reshape(-1))
    return loss, batch_size * c["target_len"]


def load_model(key: str, root: Path):
    """(EncDec in eval mode with the trained weights, its model spec) from models/<key>/model.pt."""
    return base.load_model(key, root, ModelNotTrainedError, ("encdec",))


train = base.train   # the one training entry (components/families/base.py)


# ---------------------------------------------------------------------------
# Decoding (also what `genflow sample --source` does on PyTorch)
# ---------------------------------------------------------------------------

def transduce(model, config: dict, sources: Sequence[str], *, decoding: Optional[str] = None,
              beam_width: Optional[int] = None, temperature: Optional[float] = None, top_k: Optional[int] = None,
              seed: int = 0, strict: bool = True, cache: str = "full") -> list[str]:
    """Decoded targets of `sources` (greedy, sample or beam; defaults from the model spec).

    strict: refuse characters the model never saw (UnknownCharactersError) instead of mapping them
    to the unknown id; a source longer than encdec.source_len is refused unless truncate_source.
    """
    import torch

    s = {**config.get("sample", {}), **{k: v for k, v in dict(decoding=decoding, beam_width=beam_width,
                                                                  temperature=temperature, top_k=top_k).items()
                                        if v is not None}}
    if s.get("decoding", "greedy") not in ("greedy", "sample", "beam"):
        raise Seq2SeqError(f"decoding: expected greedy, sample or beam, got {s['decoding']!r}")
    if int(s.get("beam_width", 1)) < 1:
        raise Seq2SeqError(f"beam_width: must be >= 1 (1 is greedy), got {s['beam_width']}")
    tok = pair_tokenizer(config["vocab"])
    c = EncDecConfig(**config["encdec"])
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(sources), EVAL_BATCH):
            chunk = sources[i:i + EVAL_BATCH]
            src, mask = pad([source_ids(tok, x, c.source_len, c.truncate_source, strict=strict) for x in chunk],
                            tok.pad_id)
            kw = dict(allowed_tokens=tok.allowed_tokens)
            if s.get("decoding") == "beam":
                ids = model.beam_search(src, mask, tok.bos_id, tok.eos_id, c.target_len, int(s["beam_width"]), **kw)
            else:
                ids = model.generate(src, mask, tok.bos_id, tok.eos_id, c.target_len,
                                     greedy=s.get("decoding", "greedy") == "greedy",
                                     temperature=float(s.get("temperature", 1.0)), top_k=int(s.get("top_k", 0)),
                                     generator=gen, cache=cache, **kw)
            out += [tok.decode_target(row) for row in ids]
    return out


def target_nll(model, config: dict, pairs: Sequence[tuple[str, str]]) -> tuple[float, int]:
    """(summed nats, target tokens) of the pairs' targets + end markers given their sources."""
    import torch
    import torch.nn.functional as F

    tok = pair_tokenizer(config["vocab"])
    c = EncDecConfig(**config["encdec"])
    nats, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(pairs), EVAL_BATCH):
            src, mask, tgt_in, tgt_out = pair_tensors(tok, pairs[i:i + EVAL_BATCH], c.source_len, c.truncate_source)
            logits = model(src, tgt_in, mask)
            nats += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1),
                                          ignore_index=-100, reduction="sum"))
            n += int((tgt_out != -100).sum())
    return nats, n


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def evaluate(key: str, params: Params, root: Path) -> dict:
    """Score model `key` on its test pairs; write reports/<key>/metrics.json, details.json, samples.txt."""
    from components.training import set_threads

    root = Path(root)
    m = params.model(key)
    check(key, m)
    set_threads(m.train.threads)
    model, config = load_model(key, root)

    def decode(sources, **kw):
        return transduce(model, config, sources, seed=m.train.seed, strict=False, **kw)

    def nll(pairs):
        return target_nll(model, config, pairs)

    metrics, details = evaluate_pairs(key, m, config, root, decode, nll)
    metrics.update(decode_speed(model, config, [s for s, _ in details.pop("speed_pairs")]))
    metrics["perf/sample_ms_per_item"] = metrics["perf/decode_ms_per_char_cached"]
    details["cross_cache_speedup"] = (metrics["perf/decode_ms_per_char_no_cross_cache"]
                                      / max(metrics["perf/decode_ms_per_char_cached"], 1e-12))
    details["cache_speedup"] = (metrics["perf/decode_ms_per_char_nocache"]
                                / max(metrics["perf/decode_ms_per_char_cached"], 1e-12))
    out = Layout(root).report_dir(key)
    write_json(out / "metrics.json", metrics)
    write_json(out / "details.json", details)
    return metrics


def evaluate_pairs(key: str, m: ModelConfig, config: dict, root: Path, decode, nll) -> tuple[dict, dict]:
    """The metrics every model on pairs reports, given its decode(sources) -> targets and
    nll(pairs) -> (nats, tokens); writes samples.txt. Returns (metrics, details)."""
    from components import data
    from components.evaluation import seq2seq as metrics_of

    train = data.load_pairs(m.dataset, "train", root)
    test = data.load_pairs(m.dataset, "test", root)
    if not test:
        raise Seq2SeqError(f"datasets.{m.dataset}: the test split is empty; set split.test > 0")
    tok = pair_tokenizer(config["vocab"])
    metrics: dict[str, float] = {}
    t = time.perf_counter()
    metrics["eval/bits_per_char"] = metrics_of.bits_per_char(*nll(test))
    # the same targets after another test pair's source: how much the model reads its source at all
    metrics["eval/bits_per_char_other_source"] = metrics_of.bits_per_char(*nll(metrics_of.other_sources(test)))
    shown = test[:max(1, m.eval.num_samples)]
    t_dec = time.perf_counter()
    hyps = decode([s for s, _ in shown])
    metrics["perf/decode_seconds"] = time.perf_counter() - t_dec
    metrics["perf/eval_seconds"] = time.perf_counter() - t
    metrics.update(metrics_of.text_scores(hyps, [r for _, r in shown]))
    metrics.update(metrics_of.retrieval_baseline(train, shown))
    orders = sorted(set(m.eval.ngram_orders) | {4})
    metrics.update(metrics_of.target_ngram_baselines([t for _, t in train], [t for _, t in test], tok, orders))
    metrics["eval/unknown_chars"] = float(sum(sum(tok.unknown_chars(s + t).values()) for s, t in test))
    s = m.sample
    how = f"{s.decoding}" + (f", beam width {s.beam_width}" if s.decoding == "beam" else "")
    body = "".join(f"source:    {src}\nreference: {ref}\nmodel:     {hyp}\n\n"
                   for (src, ref), hyp in list(zip(shown, hyps))[:SAMPLES_SHOWN])
    write_text(Layout(root).report_dir(key) / "samples.txt", f"=== {key}: test pairs, {how} decoding ===\n\n" + body)
    details = {"test_pairs": len(test), "decoded_pairs": len(shown), "decoding": how,
               "speed_pairs": test[:SPEED_SOURCES]}
    return metrics, details


def ms_per_char(decoders: Mapping[str, Callable[[str], object]], sources: Sequence[str],
                chars: int) -> dict[str, float]:
    """ms per decoded character of each decoder(source), the sources decoded one at a time: each warmed
    up once, then all timed side by side (SPEED_REPEATS rounds in turn, each one's median). A decoder
    step on one source is a few small matmuls, so a slow spell of the machine would otherwise move
    the ratios more than the caches do. The GPT on pairs (transformer.py) times its decoding here too."""
    runs = {name: (lambda d=d: [d(src) for src in sources]) for name, d in decoders.items()}
    for run in runs.values():
        run()   # warm-up
    secs = interleaved_seconds(runs, repeats=SPEED_REPEATS)
    return {name: t * 1e3 / max(chars, 1) for name, t in secs.items()}


def decode_speed(model, config: dict, sources: Sequence[str]) -> dict[str, float]:
    """ms per decoded target character, greedy, one source at a time: both caches, no cross-attention
    cache (self-attention cache only), no cache at all (ms_per_char)."""
    import torch

    with torch.no_grad():
        chars = sum(len(t) + 1 for t in transduce(model, config, sources, decoding="greedy", strict=False))
        decoders = {name: (lambda src, cache=cache: transduce(model, config, [src], decoding="greedy",
                                                               strict=False, cache=cache))
                    for name, cache in (("cached", "full"), ("no_cross_cache", "self"), ("nocache", "none"))}
        return {f"perf/decode_ms_per_char_{name}": v for name, v in ms_per_char(decoders, sources, chars).items()}
