"""A masked (absorbing-state) diffusion language model over characters, in one file.

MDLM (Sahoo et al. 2024) and MD4 (Shi et al. 2024): the forward process replaces each token,
independently, by a [MASK] token with probability t (linear schedule, alpha_t = 1 - t), so at
t = 0 nothing is masked and at t = 1 everything is. A bidirectional transformer (rotary
positions) sees the partly masked sequence and predicts every position's token::

    net = MaskedLM(GPTConfig(n_layer=4, n_head=4, n_embd=192, block_size=128), vocab_size=V + 1)
    logits = net(input_ids)    # (B, T) int64, id V is [MASK] -> (B, T, V): never predicts [MASK]

    process = MaskedDiffusion(mask_id=V, eps=1e-3)
    loss = process.training_loss(net, x0, generator)                    # continuous-time NELBO / token
    ids = process.sample(net, batch=4, length=128, steps=32)            # K = 32 parallel steps

Loss (the continuous-time ELBO of the absorbing process, both papers' eq. for a linear schedule):
``E_{t ~ U(eps, 1)} [ (1/t) * sum over masked positions i of -log p(x_i | x_t) ]``, divided by
the sequence length. Positions that are not masked carry over unchanged, so only masked
positions are scored ("SUBS" parameterisation); the network is not told t (MDLM shows the
absorbing process does not need it).

Sampling in K steps: the masked share goes from 1 to 0 on the grid t_k = k/K; from t to
s = t - 1/K, the expected share (t - s)/t of the still-masked positions is unmasked, at
positions drawn uniformly among them, each with a token drawn from the model's distribution.
Positions unmasked in the same step are drawn independently (the source of the quality/speed
trade-off against K). components/inference.py mirrors `sample` in numpy for onnxruntime; both
draw their randomness from ``rand(shape) -> float64 in [0, 1)`` in the same order, so they give
the same tokens from the same draws.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from components.config import GPTConfig  # noqa: F401  (re-exported: the network's shape)
from components.models.gpt import init_gpt2_weights

Rand = Callable[[tuple], torch.Tensor]  # shape -> float64 uniform draws in [0, 1)


class MaskedDiffusionError(ValueError):
    """A masked-diffusion setting (masked.eps, sample.steps, a length) is out of range; one line."""


def _tracing() -> bool:
    # shape checks on symbolic sizes would become export guards; skip them when exporting
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


# ---------------------------------------------------------------------------
# The network: a bidirectional transformer
# ---------------------------------------------------------------------------

def rotary_tables(T: int, head_dim: int, device=None, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions 0..T-1: each (T, head_dim / 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]  # (T, hs/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) channel pair of x (B, nh, T, hs) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)                                                # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with no mask: every position sees the whole sequence.

    Positions enter as rotary embeddings (RoPE, as in MDLM's backbone): q.k then depends on the
    distance between two positions, so "look at my neighbour" is there from the first step.
    With learned absolute positions instead, a 4-layer model sat at the unigram loss for the
    first few hundred steps here: nothing else tells a bidirectional model where its neighbours are.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)     # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)     # (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                    # (B, T, C)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.c_proj(self.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class MaskedLM(nn.Module):
    """Token ids with [MASK] -> logits over the other ids (the last id, vocab_size - 1, is [MASK]).

    GPT-shaped (GPTConfig: n_layer, n_head, n_embd, block_size, dropout, bias) so that the
    export and the engine read its shape the same way; block_size is the longest sequence it
    takes (positions are rotary, so no table limits it, but it was trained at that length).
    The output layer is tied to the embeddings of the vocab_size - 1 real tokens, so the
    network can never predict [MASK].
    """

    def __init__(self, config: GPTConfig, vocab_size: int):
        super().__init__()
        if vocab_size < 3:
            raise MaskedDiffusionError(f"vocab_size: expected at least 2 tokens plus [MASK], got {vocab_size}")
        if config.n_embd % config.n_head != 0 or (config.n_embd // config.n_head) % 2 != 0:
            raise MaskedDiffusionError(f"gpt.n_head: {config.n_head} heads must divide gpt.n_embd {config.n_embd} "
                                       "into heads of an even size (rotary positions rotate channel pairs)")
        self.config = config
        self.vocab_size = vocab_size          # input ids, [MASK] included
        self.mask_id = vocab_size - 1
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        init_gpt2_weights(self, config.n_layer)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 in 0..vocab_size-1 -> logits (B, T, vocab_size - 1)."""
        B, T = idx.size()
        if not _tracing() and T > self.config.block_size:
            raise MaskedDiffusionError(f"input: {T} tokens exceed the context block_size="
                                       f"{self.config.block_size}; shorten the sequence")
        cos, sin = rotary_tables(T, self.config.n_embd // self.config.n_head, idx.device)  # (T, hs/2) each
        x = F.dropout(self.transformer.wte(idx), self.config.dropout, self.training)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos, sin)
        x = self.transformer.ln_f(x)
        return F.linear(x, self.transformer.wte.weight[:self.mask_id])          # (B, T, V - 1), tied


# ---------------------------------------------------------------------------
# The process: masking schedule, loss, ELBO, sampler
# ---------------------------------------------------------------------------

def check_eps(eps: float) -> float:
    if not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise MaskedDiffusionError(f"masked.eps: the smallest mask rate must be in (0, 1), got {eps!r}; "
                                   "e.g. 1e-3")
    return float(eps)


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise MaskedDiffusionError(f"sample.steps: K, the number of denoising steps, must be an integer >= 1, "
                                   f"got {steps!r}")
    return int(steps)


def unmask_counts(length: int, steps: int) -> list[int]:
    """How many positions each of the K steps unmasks (sums to `length`; the last step empties the mask).

    With n_k = floor(length * k / K) positions still masked at t_k = k/K, step k (from t_k to
    t_{k-1}) unmasks n_k - n_{k-1}: the expected share (t - s)/t of the masked ones, made whole.
    """
    check_steps(steps)
    return [length * k // steps - length * (k - 1) // steps for k in range(steps, 0, -1)]


def draw_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Inverse-CDF draws: logits (..., V), u (...) uniform in [0, 1) -> ids (...) (float64 maths)."""
    z = logits.double() / temperature
    if top_k:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    cdf = torch.cumsum(torch.exp(z - z.amax(-1, keepdim=True)), dim=-1)       # (..., V) unnormalised
    ids = (cdf < u[..., None] * cdf[..., -1:]).sum(-1)
    return ids.clamp_max(z.size(-1) - 1)


class MaskedDiffusion:
    """Absorbing-state diffusion with the linear schedule alpha_t = 1 - t.

    >>> process = MaskedDiffusion(mask_id=V, eps=1e-3)
    >>> loss = process.training_loss(net, x0, generator)
    >>> ids = process.sample(net, batch=4, length=100, steps=32, generator=generator)
    """

    def __init__(self, mask_id: int, eps: float = 1e-3):
        self.mask_id = int(mask_id)
        self.eps = check_eps(eps)

    # --- forward process ---------------------------------------------------

    @staticmethod
    def mask_rate(t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - alpha_t = t."""
        return t

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """q(x_t | x_0): each token becomes [MASK] with probability t; x0 (B, T), t (B,)."""
        u = torch.rand(x0.shape, generator=generator, device=x0.device)       # (B, T) in [0, 1)
        masked = u < self.mask_rate(t)[:, None]                                # t=0: none, t=1: all
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0)

    def weighted_nll(self, denoise: Callable, x0: torch.Tensor, t: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(1/t) * sum over masked positions of -log p(x0_i | x_t), per sequence: (B,) nats."""
        xt = self.add_noise(x0, t, generator)
        logits = denoise(xt)                                                   # (B, T, V-1)
        nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")    # (B, T)
        masked = (xt == self.mask_id).to(nll.dtype)
        return (nll * masked).sum(1) / t

    def training_loss(self, denoise: Callable, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Continuous-time NELBO per token, t ~ U(eps, 1) drawn low-discrepancy over the batch."""
        B, T = x0.shape
        # one uniform shifted over B even strata: same expectation, less variance (MDLM's sampler)
        u = (torch.rand(1, generator=generator) + torch.arange(B) / B) % 1.0  # (B,)
        t = (self.eps + (1 - self.eps) * u).to(x0.device)
        return self.weighted_nll(denoise, x0, t, generator).sum() / (B * T)

    # --- likelihood bound --------------------------------------------------

    @torch.no_grad()
    def bits_per_char_bound(self, denoise: Callable, ids: np.ndarray, block_size: int, *, draws: int = 8,
                            seed: int = 0, batch_size: int = 64) -> tuple[float, float]:
        """(upper bound on bits per character, its standard error) over a long id sequence.

        The sequence is cut into windows of block_size ids (the last one shorter), each scored
        as one sample of the model. The bound is the discrete-time NELBO with T = round(1/eps)
        steps, E_{i ~ U{1..T}} [(1/t_i) sum_masked -log p(x | x_{t_i})] with t_i = i/T: an upper
        bound on -log p of the model's T-step ancestral sampler (the continuous-time bound is
        its T -> infinity limit, tighter still), with finite variance because t >= 1/T. It is
        estimated with `draws` draws of t per window, stratified over all windows x draws, from a
        fixed seed. The standard error treats the draws as independent (conservative).
        """
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            raise MaskedDiffusionError("ids: nothing to score")
        windows = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
        T = max(1, round(1 / self.eps))
        rng = np.random.default_rng(seed)
        n = len(windows) * draws
        u = (rng.permutation(n) + rng.random(n)) / n                           # stratified in [0, 1)
        t_all = np.clip(np.ceil(u * T), 1, T) / T                              # on the grid 1/T .. 1
        gen = torch.Generator().manual_seed(seed)
        jobs = [(w, t_all[j * draws + d]) for j, w in enumerate(windows) for d in range(draws)]
        jobs.sort(key=lambda job: len(job[0]))                                 # equal lengths batch together
        values = []
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b:b + batch_size]
            for length in sorted({len(w) for w, _ in chunk}):
                part = [(w, t) for w, t in chunk if len(w) == length]
                x0 = torch.from_numpy(np.stack([w for w, _ in part]))           # (b, L)
                t = torch.tensor([t for _, t in part], dtype=torch.float32)
                values.extend(self.weighted_nll(denoise, x0, t, gen).double().tolist())
        tokens = draws * len(ids)
        total = float(np.sum(values))
        # per-window value / window length has the same mean; use per-token values for the spread
        lengths = np.array([len(w) for w, _ in jobs], dtype=np.float64)
        per_token = np.asarray(values) / lengths
        stderr = float(per_token.std(ddof=1) / math.sqrt(len(per_token))) if len(per_token) > 1 else 0.0
        ln2 = math.log(2)
        return total / tokens / ln2, stderr / ln2

    # --- reverse process ---------------------------------------------------

    @torch.no_grad()
    def sample(self, denoise: Callable, batch: int, length: int, steps: int, *,
               prompt: Optional[torch.Tensor] = None, temperature: float = 1.0, top_k: int = 0,
               generator: Optional[torch.Generator] = None, rand: Optional[Rand] = None) -> torch.Tensor:
        """Draw `batch` sequences: the prompt ids (P,) then `length` generated ids; returns (B, P + length).

        K = steps network calls at most (a step that unmasks nothing is skipped). Randomness
        comes from rand(shape) (default: torch.rand with `generator`), per step first the
        position scores (B, P + length), then the token uniforms (B, n).
        """
        steps = check_steps(steps)
        if length < 1:
            raise MaskedDiffusionError(f"sample.length: must be at least 1, got {length}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise MaskedDiffusionError(f"sample.temperature: must be > 0, got {temperature}")
        rand = rand or (lambda shape: torch.rand(shape, generator=generator, dtype=torch.float64))
        prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long)
        x = torch.cat([prompt.view(1, -1).expand(batch, -1),
                       torch.full((batch, length), self.mask_id, dtype=torch.long)], dim=1)  # (B, P + L)
        for n in unmask_counts(length, steps):
            if n == 0:
                continue
            logits = denoise(x)                                                # (B, P + L, V-1)
            masked = x == self.mask_id
            scores = torch.where(masked, rand(x.shape), torch.full(x.shape, 2.0, dtype=torch.float64))
            chosen = torch.argsort(scores, dim=1)[:, :n]                       # (B, n) random masked positions
            picked = torch.gather(logits, 1, chosen[..., None].expand(-1, -1, logits.size(-1)))  # (B, n, V-1)
            tokens = draw_tokens(picked, rand((batch, n)), temperature, top_k)  # (B, n)
            x = x.scatter(1, chosen, tokens)
        return x
