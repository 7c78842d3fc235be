"""An encoder-decoder transformer (the seed's sequence-transduction model), in one file.

The seed's shape: an encoder stack of self-attention + feed-forward layers over the source; a
decoder stack of masked (causal) self-attention, encoder-decoder cross-attention and feed-forward
layers over the target so far; a linear + softmax head. Two deliberate differences from the
original paper, both GPT's (components/models/gpt.py), whose blocks this file imports rather than
copies: **pre-norm** residual blocks (LayerNorm before each sub-layer, a final LayerNorm after each
stack: trains stably without warm-up tricks at these sizes) and rotary positions (RoPE) on the
self-attention queries and keys instead of sinusoidal position tables. Cross-attention carries no
positions: the encoder's outputs already do. One character embedding is shared by the source,
the target and the output layer (tied).

    model = EncDec(EncDecConfig(), vocab_size)
    logits = model(src, tgt_in, src_mask)             # teacher forcing: (B, T, V)
    cross_kv = model.encode(src, src_mask)           # once per source
    logits, past = model.decode(tok, cross_kv, src_mask, past)   # one decoding step, cached

Shapes:
    src       (B, S) int64; src_mask (B, S) bool, True at real (not padding) positions
    cross_kv  (n_layer_dec, 2, B, n_head, S, head_dim): each decoder layer's keys and values of
              the encoder output, computed once per source (the cross-attention cache)
    past_kv   (n_layer_dec, 2, B, n_head, T_past, head_dim): the decoder self-attention cache

Decoding: ``generate`` (greedy or sampling, batched) and ``beam_search``; both keep the
self-attention cache and compute the cross-attention keys/values once. ``cache="self"`` re-encodes
the source every step (no cross-attention cache) and ``cache="none"`` re-runs encoder and decoder
over the whole prefix every step: the baselines perf/ measures the cache against.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from components.config import EncDecConfig, GPTConfig
from components.models.gpt import (
    MLP,
    Block,
    ContextLengthError,
    SamplingError,
    SelfAttention,
    init_gpt2_weights,
    inverse_frequencies,
    pick_next,
    rotary,
)

__all__ = ["EncDec", "EncDecConfig", "CrossAttention", "DecoderBlock", "ContextLengthError", "SamplingError",
           "run_encoder", "key_mask"]

Cache = Literal["full", "self", "none"]


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def block_config(c: EncDecConfig) -> GPTConfig:
    """The GPT block settings the encoder and decoder layers are built from."""
    return GPTConfig(n_layer=c.n_layer_enc + c.n_layer_dec, n_head=c.n_head, n_embd=c.n_embd,
                     block_size=max(c.source_len, c.target_len), dropout=c.dropout, bias=c.bias)


# ---------------------------------------------------------------------------
# Blocks (self-attention and MLP are GPT's)
# ---------------------------------------------------------------------------

def key_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, S) bool -> (B, 1, 1, S): every query may look at the real (not padding) positions only."""
    return None if mask is None else mask[:, None, None, :]


def run_encoder(blocks: nn.ModuleList, ln: nn.Module, x: torch.Tensor, rope, mask: Optional[torch.Tensor]):
    """The encoder stack: non-causal GPT blocks over x (B*S, C), then the final LayerNorm; mask is
    key_mask's (B, 1, 1, S). The text encoder (components/models/textenc.py) runs the same stack."""
    for block in blocks:
        x, _, _ = block(x, rope, None, mask)   # not causal: every position sees every other
    return ln(x)


class CrossAttention(nn.Module):
    """Multi-head attention of the decoder's positions (queries) over the encoder's (keys, values)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)   # from the encoder output
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def memory_kv(self, memory: torch.Tensor) -> torch.Tensor:
        """(B, S, C) encoder output -> (2, B, nh, S, hs) keys and values (computed once per source)."""
        B, S, C = memory.shape
        return self.c_kv(memory).view(B, S, 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, cross_kv: torch.Tensor, src_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # x (B*T, C); cross_kv (2, B, nh, S, hs); src_mask (B, 1, 1, S) bool or None
        B, C = cross_kv.size(1), self.n_embd
        T = x.size(0) // B
        q = self.c_q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, cross_kv[0], cross_kv[1], attn_mask=src_mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = self.c_proj(y.transpose(1, 2).reshape(B * T, C))
        return F.dropout(y, self.dropout, self.training) if self.dropout > 0 else y


class DecoderBlock(nn.Module):
    """Pre-norm: x + SelfAttn(LN x) (causal, GPT's), + CrossAttn(LN x, encoder), + MLP(LN x) (GPT's)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config, causal=True)
        self.ln_cross = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.cross = CrossAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope, cross_kv, src_mask, past=None, mask=None):
        a, k, v = self.attn(self.ln_1(x), rope, past, mask)
        x = x + a
        x = x + self.cross(self.ln_cross(x), cross_kv, src_mask)
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class EncDec(nn.Module):
    def __init__(self, config: EncDecConfig, vocab_size: int):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size: expected at least 2 tokens, got {vocab_size}")
        if config.n_layer_enc < 1 or config.n_layer_dec < 1:
            raise ValueError("encdec.n_layer_enc / n_layer_dec: need at least one layer each")
        self.config, self.vocab_size = config, vocab_size
        bc = block_config(config)
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.encoder = nn.ModuleList([Block(bc, causal=False) for _ in range(config.n_layer_enc)])
        self.ln_enc = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.decoder = nn.ModuleList([DecoderBlock(bc) for _ in range(config.n_layer_dec)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight   # one table for source, target and output
        self.register_buffer("inv_freq", inverse_frequencies(config.n_embd // config.n_head), persistent=False)
        init_gpt2_weights(self, bc.n_layer)

    key_mask = staticmethod(key_mask)

    def encode(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The cross-attention cache of a source batch: (n_layer_dec, 2, B, n_head, S, head_dim)."""
        B, S = src.shape
        if not _tracing() and S > self.config.source_len:
            raise ContextLengthError(f"source: {S} characters, longer than encdec.source_len="
                                     f"{self.config.source_len}; shorten it (or set encdec.truncate_source)")
        rope = rotary(torch.arange(S, device=src.device), self.inv_freq)
        mask = self.key_mask(src_mask)
        x = self.drop(self.wte(src.reshape(-1)))   # (B*S, C)
        memory = run_encoder(self.encoder, self.ln_enc, x, rope, mask).view(B, S, -1)   # (B, S, C)
        return torch.stack([blk.cross.memory_kv(memory) for blk in self.decoder])

    def decode(self, tgt: torch.Tensor, cross_kv: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
               past_kv: Optional[torch.Tensor] = None, use_cache: bool = True):
        """Logits (B, T, V) of the target tokens tgt (B, T) at positions T_past.., and the extended
        self-attention cache (None with use_cache=False). Causal: position t sees targets <= t only."""
        B, T = tgt.shape
        past_len = 0 if past_kv is None else past_kv.size(4)
        if not _tracing() and past_len + T > self.config.target_len:
            raise ContextLengthError(f"target: {past_len + T} tokens exceed encdec.target_len={self.config.target_len}")
        pos = torch.arange(past_len, past_len + T, device=tgt.device)
        rope = rotary(pos, self.inv_freq)
        if past_kv is None or (T == 1 and not _tracing()):
            mask = None   # no past: SDPA's causal triangle; one new token sees every cached key
        else:
            mask = torch.arange(past_len + T, device=tgt.device)[None, :] <= pos[:, None]   # (T, T_past + T)
        smask = self.key_mask(src_mask)
        x = self.drop(self.wte(tgt.reshape(-1)))   # (B*T, C)
        keys, values = [], []
        for i, block in enumerate(self.decoder):
            x, k, v = block(x, rope, cross_kv[i], smask, None if past_kv is None else past_kv[i], mask)
            keys.append(k)
            values.append(v)
        logits = self.lm_head(self.ln_f(x)).view(B, T, -1)
        present = torch.stack([torch.stack(keys), torch.stack(values)], dim=1) if use_cache else None
        return logits, present

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) of the next target token after each of tgt (B, T)."""
        return self.decode(tgt, self.encode(src, src_mask), src_mask, use_cache=False)[0]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -----------------------------------------------------------------------
    # Decoding
    # -----------------------------------------------------------------------

    def _step(self, src, src_mask, cross_kv, prefix, past, cache: Cache):
        """Next-token logits (B, V) after `prefix` (B, t), and the new self-attention cache."""
        if cache == "none":   # recompute everything over the whole prefix
            return self(src, prefix, src_mask)[:, -1], None
        if cache == "self":   # the encoder and the cross-attention keys/values again, every step
            cross_kv = self.encode(src, src_mask)
        logits, past = self.decode(prefix[:, -1:] if past is not None else prefix, cross_kv, src_mask, past)
        return logits[:, -1], past

    @torch.no_grad()
    def generate(self, src: torch.Tensor, src_mask: Optional[torch.Tensor], bos_id: int, eos_id: int,
                 max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                 allowed_tokens: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 cache: Cache = "full") -> list[list[int]]:
        """Greedy (argmax) or sampled targets for a batch of sources; each a list of ids without the
        start and end markers. Stops at eos_id or after max_new_tokens (<= encdec.target_len)."""
        self._check(max_new_tokens, temperature, top_k)
        B = src.size(0)
        cross_kv = self.encode(src, src_mask) if cache == "full" else None
        prefix = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        past = None
        for _ in range(max_new_tokens):
            logits, past = self._step(src, src_mask, cross_kv, prefix, past, cache)
            if allowed_tokens is not None:
                logits = logits[:, :allowed_tokens]
            nxt = pick_next(logits, greedy, temperature, top_k, generator)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            prefix = torch.cat([prefix, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        out = []
        for row in prefix[:, 1:].tolist():
            out.append(row[:row.index(eos_id)] if eos_id in row else row)
        return out

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, src_mask: Optional[torch.Tensor], bos_id: int, eos_id: int,
                    max_new_tokens: int, beam_width: int, allowed_tokens: Optional[int] = None) -> list[list[int]]:
        """The most likely target (sum of log-probabilities) of each source among beam_width hypotheses
        per step; width 1 is greedy decoding exactly. Cached like generate (cross K/V once a source)."""
        if beam_width < 1:
            raise SamplingError(f"beam_width: must be >= 1, got {beam_width}")
        self._check(max_new_tokens, 1.0, 0)
        return [self._beam_one(src[i:i + 1], None if src_mask is None else src_mask[i:i + 1], bos_id, eos_id,
                               max_new_tokens, beam_width, allowed_tokens) for i in range(src.size(0))]

    def _beam_one(self, src, src_mask, bos_id, eos_id, max_new_tokens, k, allowed_tokens):
        cross = self.encode(src, src_mask)                 # (L, 2, 1, nh, S, hs)
        seqs: list[list[int]] = [[]]
        scores = torch.zeros(1)
        finished: list[tuple[float, list[int]]] = []
        past, tok = None, torch.tensor([[bos_id]], device=src.device)
        for step in range(max_new_tokens):
            n = len(seqs)
            logits, past = self.decode(tok, cross.expand(-1, -1, n, -1, -1, -1),
                                       None if src_mask is None else src_mask.expand(n, -1), past)
            logp = F.log_softmax(logits[:, -1].float(), -1)   # (n, V)
            if allowed_tokens is not None:
                logp[:, allowed_tokens:] = float("-inf")
            V = logp.size(1)
            cand = (scores[:, None] + logp).view(-1)
            top = cand.topk(min(2 * k, cand.numel()))
            rows, toks, new_scores, new_seqs = [], [], [], []
            for s, i in zip(top.values.tolist(), top.indices.tolist()):
                r, t = divmod(i, V)
                if t == eos_id or step == max_new_tokens - 1:   # the last step ends every hypothesis
                    finished.append((s, seqs[r] + ([] if t == eos_id else [t])))
                    continue
                rows.append(r)
                toks.append(t)
                new_scores.append(s)
                new_seqs.append(seqs[r] + [t])
                if len(new_seqs) == k:
                    break
            best_done = max((f[0] for f in finished), default=float("-inf"))
            # scores only fall as hypotheses grow: once a finished one beats every live one, stop
            if not new_seqs or best_done >= max(new_scores):
                break
            index = torch.tensor(rows, device=src.device)
            past = past.index_select(2, index)
            seqs, scores = new_seqs, torch.tensor(new_scores)
            tok = torch.tensor(toks, device=src.device)[:, None]
        return max(finished, key=lambda f: f[0])[1] if finished else seqs[int(scores.argmax())]

    def _check(self, max_new_tokens: int, temperature: float, top_k: int) -> None:
        if not temperature > 0:
            raise SamplingError(f"temperature: must be > 0, got {temperature}")
        if top_k < 0:
            raise SamplingError(f"top_k: must be >= 0 (0: off), got {top_k}")
        if not 1 <= max_new_tokens <= self.config.target_len:
            raise SamplingError(f"max_new_tokens: must be in 1..encdec.target_len={self.config.target_len}, "
                                f"got {max_new_tokens}")
