"""Training throughput (tokens/s) of our GPT against Hugging Face transformers' GPT2LMHeadModel.

Same layers, width, heads, context, vocabulary and batch (defaults: params.yaml models.pydoc-gpt);
both train with AdamW on the same random batches, cross-entropy computed the same way, dropout off.
Timed in alternating repeats (ours, theirs, ours, ...) so that load from other processes hits both
alike; the median of each is reported with their ratio. GPT-2 keeps its biases (it cannot drop
them), so it has slightly more parameters.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_gpt_train.py [--model pydoc-gpt] [--repeats 5] [--steps 10]

Needs `pip install transformers` (a benchmark dependency only; genflow never imports it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def build_ours(gpt_cfg, vocab_size: int):
    from components.models.gpt import GPT

    model = GPT(gpt_cfg, vocab_size)
    return model, lambda x: model(x, use_cache=False)[0]


def build_hf(gpt_cfg, vocab_size: int, attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=gpt_cfg.block_size, n_embd=gpt_cfg.n_embd,
                     n_layer=gpt_cfg.n_layer, n_head=gpt_cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, activation_function="gelu_new", use_cache=False,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg)
    model.config._attn_implementation = attn
    for m in model.modules():  # the attention modules read the implementation from their config
        if hasattr(m, "config"):
            m.config._attn_implementation = attn
    return model, lambda x: model(input_ids=x, use_cache=False).logits


def tokens_per_second(model, forward, batches, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    t = time.perf_counter()
    for x, y in batches[:steps]:
        logits = forward(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return steps * batches[0][0].numel() / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pydoc-gpt", help="params.yaml model key whose gpt/train shape to use")
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--vocab-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    args = ap.parse_args()

    from components.config import load_params

    m = load_params(args.params).model(args.model)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    B, T, V = m.train.batch_size, m.gpt.block_size, args.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g))
               for _ in range(args.steps)]

    torch.manual_seed(0)
    ours, ours_fwd = build_ours(m.gpt, V)
    hf, hf_fwd = build_hf(m.gpt, V, args.hf_attn)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    print(f"shape: n_layer={m.gpt.n_layer} n_head={m.gpt.n_head} n_embd={m.gpt.n_embd} block_size={T} "
          f"batch={B} vocab={V} threads={torch.get_num_threads()}")
    print(f"params: ours {n_ours:,}  GPT2LMHeadModel {n_hf:,} (attention: {args.hf_attn})")

    tokens_per_second(ours, ours_fwd, batches, 2)  # warm-up both
    tokens_per_second(hf, hf_fwd, batches, 2)
    ours_tps, hf_tps = [], []
    for r in range(args.repeats):
        ours_tps.append(tokens_per_second(ours, ours_fwd, batches, args.steps))
        hf_tps.append(tokens_per_second(hf, hf_fwd, batches, args.steps))
        print(f"repeat {r + 1}: ours {ours_tps[-1]:8.0f} tok/s   GPT2LMHeadModel {hf_tps[-1]:8.0f} tok/s", flush=True)
    a, b = statistics.median(ours_tps), statistics.median(hf_tps)
    print(f"median: ours {a:.0f} tok/s, GPT2LMHeadModel {b:.0f} tok/s, ratio ours/HF = {a / b:.2f}x")


if __name__ == "__main__":
    main()
