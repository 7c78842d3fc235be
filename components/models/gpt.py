"""A decoder-only transformer (GPT) with a key/value cache, in one file.

nanoGPT-style: pre-LayerNorm blocks, multi-head causal self-attention through
``F.scaled_dot_product_attention``, the output layer tied to the token
embedding. Positions enter as rotary embeddings (RoPE) on queries and keys
rather than nanoGPT's learned position table: with a few minutes of CPU
training a character model learned markedly faster with them (2.52 against
2.72 bits/char after 600k tokens, pydoc), and they cost no parameters. The
same class models characters of text and the 64 pixels of a digit (a class
token, then 17 grey levels per pixel).

The cache is one tensor so that the ONNX graph has one input and one output
for it::

    logits, present_kv = model(idx, past_kv)
    # idx         (B, T)                                   int64 token ids
    # past_kv     (n_layer, 2, B, n_head, T_past, head_dim) or None
    # logits      (B, T, vocab_size)
    # present_kv  (n_layer, 2, B, n_head, T_past + T, head_dim)

Positions start at T_past (a key is rotated before it is cached). With a
past (even an empty one, T_past = 0) the attention mask is explicit,
``key_pos <= T_past + query_pos``: SDPA's ``is_causal`` aligns the triangle
top-left and would hide the past from a decode step. One exported graph
therefore serves prefill and decode. (Eager one-token steps skip the mask,
which is all-true for them.)

``generate`` does not grow that tensor: its ``Decoder`` preallocates the cache
for the whole context and writes each step's keys and values in place, with
the same maths (tests check the logits agree). Sampling 256 tokens that way
was 3.2-4.8x faster than re-running the context for every token, against
2.0-2.4x with the growing cache (pydoc-gpt's shape on a shared 2-core CPU;
bench/bench_kv_cache.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from components.config import GPTConfig
from components.errors import ConfigError, ModelError
from components.sampling.requests import SamplingRequestError

__all__ = ["GPT", "GPTConfig", "Decoder", "SamplingError", "ContextLengthError"]


class SamplingError(SamplingRequestError):
    """A generation parameter (temperature, top_k, max_new_tokens) is out of range."""


class ContextLengthError(ModelError):
    """A prompt or an input is longer than the model's context (block_size)."""


def _tracing() -> bool:
    # Shape checks on symbolic sizes would become export guards; skip them when exporting.
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------

def inverse_frequencies(head_dim: int) -> torch.Tensor:
    """The rotary frequencies 10000^(-2i / head_dim) of the channel pairs, (head_dim / 2,)."""
    if head_dim % 2:
        raise ConfigError(f"n_embd / n_head: the head size {head_dim} must be even for rotary positions")
    return 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rotary(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos * inv_freq, each (T, 1, 1, head_dim / 2)."""
    angles = (pos[:, None].float() * inv_freq[None, :])[:, None, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + hs/2}) of x (B, T, ..., hs) by the angle of each position."""
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal (GPT) or not (causal=False: every position sees every
    other, the masked diffusion model's denoiser in components.models.mdlm)."""

    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.causal = causal
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], past: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x (B*T, C); rope: cos, sin (T, 1, 1, hs/2); past (2, B, nh, T_past, hs); mask (T, T_past + T) bool or None
        T, C = rope[0].size(0), x.size(1)
        B = x.size(0) // T
        hs = C // self.n_head
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, hs)
        qk = apply_rotary(qkv[:, :, :2], *rope)  # (B, T, 2, nh, hs): q and k at positions T_past + t
        q = qk[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
        k = qk[:, :, 1].transpose(1, 2)  # (B, nh, T, hs)
        v = qkv[:, :, 2].transpose(1, 2)  # (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and past is None,  # with a past: the explicit mask
            dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B * T, C)  # re-assemble the heads side by side
        y = self.c_proj(y)
        if self.dropout > 0:
            y = F.dropout(y, self.dropout, self.training)
        return y, k, v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config, causal)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], past: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn(self.ln_1(x), rope, past, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


# ---------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------

def init_gpt2_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) for linears and embeddings, zero biases, and the residual
    projections (c_proj) scaled by 1/sqrt(2 * n_layer)."""
    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    model.apply(init)   # children before parents: the draw order (and so the weights) of every seed stays
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


def pick_next(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int,
              generator: torch.Generator | None) -> torch.Tensor:
    """(B,) next ids from last-position logits (B, V): argmax, or a draw at `temperature` among the
    top_k (0: all) most likely. The decoders that stop at an end marker share it (encdec, pairs GPT)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)[:, 0]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, vocab_size: int):
        super().__init__()
        if vocab_size < 2:
            raise ModelError(f"vocab_size: expected at least 2 tokens, got {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity(),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        inv_freq = inverse_frequencies(config.n_embd // config.n_head)  # (hs/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, not saved

        init_gpt2_weights(self, config.n_layer)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def forward(self, idx: torch.Tensor, past_kv: torch.Tensor | None = None,
                use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the cache extended by these T tokens.

        idx (B, T) int64; past_kv (n_layer, 2, B, n_head, T_past, head_dim) or None.
        Returns logits (B, T, vocab_size) and present_kv (n_layer, 2, B, n_head, T_past + T,
        head_dim); present_kv is None when ``use_cache=False`` (training skips the copy).
        (use_cache is positional-or-keyword: the TorchScript ONNX exporter passes defaults positionally.)
        """
        B, T = idx.size()
        past_len = 0 if past_kv is None else past_kv.size(4)
        if not _tracing() and past_len + T > self.config.block_size:
            raise ContextLengthError(
                f"input: {past_len} cached + {T} new tokens exceed the context "
                f"block_size={self.config.block_size}; crop the sequence")
        pos = torch.arange(past_len, past_len + T, dtype=torch.long, device=idx.device)  # (T,)
        rope = rotary(pos, self.inv_freq)  # cos, sin (T, 1, 1, hs/2)
        # The residual stream is kept flat, (B*T, C): every Linear is then one 2-D matmul, which
        # halves their fixed cost in one-token decoding steps.
        x = self.transformer.drop(self.transformer.wte(idx.reshape(-1)))  # (B*T, C)

        if past_kv is None:
            mask = None  # no past: SDPA's causal triangle is right and fastest
        elif T == 1 and not _tracing():
            mask = None  # one new token sees every key: nothing to hide (eager decoding fast path)
        else:
            key_pos = torch.arange(past_len + T, device=idx.device)  # (T_past + T,)
            mask = key_pos[None, :] <= pos[:, None]  # (T, T_past + T) bool: key_pos <= past_len + query_pos

        keys, values = [], []
        for i, block in enumerate(self.transformer.h):
            x, k, v = block(x, rope, None if past_kv is None else past_kv[i], mask)
            keys.append(k)  # (B, nh, T_past + T, hs)
            values.append(v)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x).view(B, T, -1)  # (B, T, vocab_size)
        present_kv = torch.stack([torch.stack(keys), torch.stack(values)], dim=1) if use_cache else None
        return logits, present_kv

    def empty_cache(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A past of length 0: (n_layer, 2, B, n_head, 0, head_dim)."""
        c = self.config
        return torch.zeros(c.n_layer, 2, batch_size, c.n_head, 0, c.n_embd // c.n_head, device=device)

    # -----------------------------------------------------------------------
    # Sampling
    # -----------------------------------------------------------------------

    def check_sampling(self, prompt_len: int, max_new_tokens: int, temperature: float, top_k: int | None,
                       allowed_tokens: int | None = None) -> None:
        """Raise a one-line SamplingError / ContextLengthError for out-of-range generation settings."""
        if not (temperature > 0 and math.isfinite(temperature)):
            raise SamplingError(f"temperature: must be > 0 (1.0 samples the model as trained), got {temperature}")
        if allowed_tokens is not None and not (1 <= allowed_tokens <= self.vocab_size):
            raise SamplingError(f"allowed_tokens: must be in 1..{self.vocab_size}, got {allowed_tokens}")
        n = self.vocab_size if allowed_tokens is None else allowed_tokens
        if top_k is not None and not (0 <= top_k <= n):
            raise SamplingError(f"top_k: must be between 0 (off) and the vocabulary size {n}, got {top_k}")
        if max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        if prompt_len < 1:
            raise ContextLengthError("prompt: empty; give at least one token to start from")
        if prompt_len > self.config.block_size:
            raise ContextLengthError(f"prompt: {prompt_len} tokens, longer than the context "
                                     f"block_size={self.config.block_size}; shorten it")

    def _next_token(self, logits: torch.Tensor, temperature: float, top_k: int | None,
                    generator: torch.Generator | None, allowed_tokens: int | None) -> torch.Tensor:
        if allowed_tokens is not None:
            logits = logits[:, :allowed_tokens]  # e.g. pixels: grey levels only, never a class token
        if temperature != 1.0:
            logits = logits / temperature  # (B, V)
        if top_k:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        cdf = F.softmax(logits, dim=-1).cumsum(-1)  # (B, V), non-decreasing
        # inverse-CDF draw: one uniform per row (torch.multinomial costs ~0.15 ms per call here)
        u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(1) - 1)  # (B, 1): first cdf > u

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, use_cache: bool = True,
                 generator: torch.Generator | None = None, allowed_tokens: int | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt ``idx`` (B, T); returns (B, T + new).

        top_k: keep only the k most likely tokens (0 or None: all). allowed_tokens: sample only
        ids 0..allowed_tokens-1 (None: all). The prompt must fit the context (ContextLengthError
        otherwise; it is not truncated). Longer outputs slide a window: without the cache every
        step sees the last block_size tokens (nanoGPT); with the cache, once it is full the last
        3/4 of the context is re-encoded and decoding goes on from there.
        """
        B, T = idx.shape
        self.check_sampling(T, max_new_tokens, temperature, top_k, allowed_tokens)
        block = self.config.block_size
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -block:], use_cache=False)
                nxt = self._next_token(logits[:, -1], temperature, top_k, generator, allowed_tokens)
                idx = torch.cat([idx, nxt], dim=1)
            return idx

        decoder = Decoder(self, B)
        new: list[torch.Tensor] = []  # (B, 1) each
        with torch.inference_mode():  # no autograd or view bookkeeping: a step is ~100 tiny ops
            logits = decoder(idx, 0)  # prefill
            n = T  # positions in the cache
            for i in range(max_new_tokens):
                new.append(self._next_token(logits, temperature, top_k, generator, allowed_tokens))
                if i == max_new_tokens - 1:
                    break
                if n < block:
                    logits = decoder(new[-1], n)
                    n += 1
                else:  # cache full: keep the most recent 3/4 of the context
                    n = max(1, block * 3 // 4)
                    logits = decoder(torch.cat([idx, *new], dim=1)[:, -n:], 0)
        return torch.cat([idx, *new], dim=1)


# ---------------------------------------------------------------------------
# Cached decoding
# ---------------------------------------------------------------------------

def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) along the last dimension."""
    return torch.roll(x, x.size(-1) // 2, dims=-1)


class Decoder:
    """Cached decoding of a GPT for one batch: ``logits = decoder(idx, start)``, as generate uses it.

    The cache is preallocated for the whole context, (n_layer, B, block_size, 2, n_head,
    head_dim) with positions before heads, and a call writes the keys and values of its T tokens
    in place at positions start..start+T-1: no copy of the past per token. The maths is
    GPT.forward's (tests check that the logits agree), written with torch.nn.functional on
    weights gathered once: a one-token step is ~25 tiny ops per layer, and nn.Module calls and
    attribute look-ups cost more than its arithmetic. Dropout is off (sampling is inference); call
    it under torch.inference_mode() or torch.no_grad().
    """

    def __init__(self, model: GPT, batch_size: int):
        c = model.config
        w = model.lm_head.weight
        self.n_head, self.n_embd, self.block_size = c.n_head, c.n_embd, c.block_size
        hs = c.n_embd // c.n_head
        self.cache = torch.zeros(c.n_layer, batch_size, c.block_size, 2, c.n_head, hs, dtype=w.dtype, device=w.device)
        self.kv = [self.cache[i] for i in range(c.n_layer)]  # per layer (B, block_size, 2, nh, hs): views
        # Rotation tables over (q, k, v) at full head width, (block_size, 3, 1, hs): for q and k,
        # x * cos + swap_halves(x) * sin is apply_rotary exactly (cos repeated, sin's first half
        # negated); v goes through unchanged (cos 1, sin 0), so k and v reach the cache in one copy.
        cos, sin = rotary(torch.arange(c.block_size, device=w.device), model.inv_freq)  # (block, 1, 1, hs/2)
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (block, 1, 1, hs)
        self.cos = torch.cat([cos, cos, torch.ones_like(cos)], dim=1).to(w.dtype)  # (block, 3, 1, hs)
        self.sin = torch.cat([sin, sin, torch.zeros_like(sin)], dim=1).to(w.dtype)

        def ln(m: nn.LayerNorm) -> tuple:
            return m.weight, m.bias, m.eps

        def linear(m: nn.Linear) -> tuple:
            return m.weight, m.bias

        self.wte = model.transformer.wte.weight
        self.layers = [(ln(b.ln_1), linear(b.attn.c_attn), linear(b.attn.c_proj),
                        ln(b.ln_2), linear(b.mlp.c_fc), linear(b.mlp.c_proj)) for b in model.transformer.h]
        self.gelu = model.transformer.h[0].mlp.gelu.approximate if c.n_layer else "tanh"
        self.ln_f, self.lm_head = ln(model.transformer.ln_f), model.lm_head.weight

    def __call__(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (B, vocab_size) after the last of the tokens idx (B, T), which sit at positions
        start..start+T-1; the cache must hold positions 0..start-1 (start 0: a prefill)."""
        B, T = idx.size()
        end = start + T
        if start < 0 or end > self.block_size:
            raise ContextLengthError(f"input: {start} cached + {T} new tokens exceed the context "
                                     f"block_size={self.block_size}; crop the sequence")
        C, nh = self.n_embd, self.n_head
        hs = C // nh
        cos, sin = self.cos[start:end], self.sin[start:end]  # (T, 3, 1, hs)
        mask = None  # start 0: SDPA's causal triangle; one new token: it sees every key
        if start > 0 and T > 1:
            mask = torch.arange(end, device=idx.device) <= torch.arange(start, end, device=idx.device)[:, None]
        x = F.embedding(idx.reshape(-1), self.wte)  # (B*T, C)
        for kv, (ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj) in zip(self.kv, self.layers):
            qkv = F.linear(F.layer_norm(x, (C,), *ln_1), *c_attn).view(B, T, 3, nh, hs)
            qkv = qkv * cos + swap_halves(qkv) * sin  # q and k rotated to their positions
            kv[:, start:end] = qkv[:, :, 1:]  # (B, T, 2, nh, hs): this call's keys and values
            k, v = kv[:, :end].permute(2, 0, 3, 1, 4)  # (B, nh, end, hs) each: views of the cache
            y = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), k, v, attn_mask=mask,
                                               is_causal=start == 0)  # (B, nh, T, hs)
            x = x + F.linear(y.transpose(1, 2).reshape(B * T, C), *attn_proj)
            h = F.gelu(F.linear(F.layer_norm(x, (C,), *ln_2), *c_fc), approximate=self.gelu)
            x = x + F.linear(h, *mlp_proj)
        x = F.layer_norm(x.view(B, T, C)[:, -1], (C,), *self.ln_f)  # (B, C): only the last position is sampled
        return F.linear(x, self.lm_head)  # (B, vocab_size)
