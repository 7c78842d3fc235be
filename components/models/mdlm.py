"""A masked (absorbing-state) diffusion language model over characters, in one file.

MDLM (Sahoo et al. 2024) and MD4 (Shi et al. 2024): the forward process replaces each token,
independently, by a [MASK] token with probability t (linear schedule, alpha_t = 1 - t), so at
t = 0 nothing is masked and at t = 1 everything is. A bidirectional transformer (rotary
positions) sees the partly masked sequence and predicts every position's token::

    net = MaskedLM(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64), V + 1, conv_kernel=9)
    logits = net(input_ids)    # (B, T) int64, id V is [MASK] -> (B, T, V): never predicts [MASK]

    process = MaskedDiffusion(mask_id=V)
    loss = process.training_loss(net, x0, generator)                    # continuous-time NELBO / token
    ids = process.sample(net, batch=4, length=64, steps=16)             # K = 16 parallel steps

Loss (the continuous-time ELBO of the absorbing process, both papers' eq. for a linear schedule):
``E_{t ~ U(0, 1)} [ (1/t) * sum over masked positions i of -log p(x_i | x_t) ]``, divided by
the sequence length; trained by default in its equivalent count form (t integrated out, see
MaskedDiffusion), which has no 1/t weight and a much less noisy gradient. Positions that are
not masked carry over unchanged, so only masked positions are scored ("SUBS"
parameterisation); the network is not told t (MDLM shows the absorbing process does not need it).

Sampling in K steps: the masked share goes from 1 to 0 on the grid t_k = k/K; from t to
s = t - 1/K, the expected share (t - s)/t of the still-masked positions is unmasked, at
positions drawn uniformly among them, each with a token drawn from the model's distribution.
Positions unmasked in the same step are drawn independently (the source of the quality/speed
trade-off against K). The schedule, the token draws and the request checks live, torch-free,
in components/sampling/masked.py, shared with the onnxruntime engine; both draw their
randomness from ``rand(shape) -> float64 in [0, 1)`` in the same order, so they give the same
tokens from the same draws.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from components.config import GPTConfig  # noqa: F401  (re-exported: the network's shape)
from components.models.gpt import Block, init_gpt2_weights, inverse_frequencies, rotary
from components.sampling.masked import MaskedDiffusionError, check_request, check_steps, draw_tokens, unmask_counts  # noqa: F401  (re-exported)

Rand = Callable[[tuple], torch.Tensor]  # shape -> float64 uniform draws in [0, 1)


def _tracing() -> bool:
    # shape checks on symbolic sizes would become export guards; skip them when exporting
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


# ---------------------------------------------------------------------------
# The network: a bidirectional transformer
# ---------------------------------------------------------------------------

class MaskedLM(nn.Module):
    """Token ids with [MASK] -> logits over the other ids (the last id, vocab_size - 1, is [MASK]).

    GPT-shaped (GPTConfig: n_layer, n_head, n_embd, block_size, dropout, bias) so that the
    export and the engine read its shape the same way; block_size is the longest sequence it
    takes (positions are rotary, so no table limits it, but it was trained at that length).
    Its blocks are GPT's (components.models.gpt.Block) with the causal mask off: every position
    attends to the whole sequence, and positions enter as rotary embeddings on queries and keys
    (q.k then depends on the distance between two positions, as in MDLM's backbone).

    Two departures from GPT, both for learning speed in minutes of CPU (pydoc, 120 s, count
    estimator, test bound in bits/char): an untied output layer with a bias, as MDLM's backbone
    has (tied to the embeddings, a bidirectional model sat near the unigram level: at 15% masking
    4.36 bits on masked characters after 300 steps, untied 3.40); and a local convolution over
    the input embeddings (``conv_kernel``, through a GELU, added to them). A [MASK] position
    holds nothing of its own in the residual stream, so until attention has learned to look at
    neighbours (slow from uniform attention) it can only predict the unigram; a GPT has the
    current token there from the first step. With the convolution the neighbours are there at
    once: bound 3.59 (9 wide) against 4.33 bits/char without it.
    The output layer is tied to the embeddings of the vocab_size - 1 real tokens, so the
    network can never predict [MASK].
    """

    def __init__(self, config: GPTConfig, vocab_size: int, conv_kernel: int = 0):
        super().__init__()
        check_conv_kernel(conv_kernel)
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
            h=nn.ModuleList([Block(config, causal=False) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        # a local convolution over the input embeddings (0: none), added to them through a GELU
        self.conv = nn.Conv1d(config.n_embd, config.n_embd, conv_kernel, padding=conv_kernel // 2) \
            if conv_kernel else None
        self.lm_head = nn.Linear(config.n_embd, vocab_size - 1)                # never predicts [MASK]
        self.register_buffer("inv_freq", inverse_frequencies(config.n_embd // config.n_head), persistent=False)
        init_gpt2_weights(self, config.n_layer)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 in 0..vocab_size-1 -> logits (B, T, vocab_size - 1)."""
        B, T = idx.size()
        if not _tracing() and T > self.config.block_size:
            raise MaskedDiffusionError(f"input: {T} tokens exceed the context block_size="
                                       f"{self.config.block_size}; shorten the sequence")
        rope = rotary(torch.arange(T, device=idx.device), self.inv_freq)      # cos, sin (T, 1, 1, hs/2)
        x = self.transformer.wte(idx)                                          # (B, T, C)
        if self.conv is not None:
            x = x + F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)       # neighbours within conv_kernel
        x = F.dropout(x.reshape(B * T, -1), self.config.dropout, self.training)  # (B*T, C)
        for block in self.transformer.h:
            x, _, _ = block(x, rope)
        x = self.transformer.ln_f(x)
        return self.lm_head(x).view(B, T, -1)                                  # (B, T, V - 1)


# ---------------------------------------------------------------------------
# The process: masking schedule, loss, ELBO, sampler
# ---------------------------------------------------------------------------

def check_eps(eps: float) -> float:
    if not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise MaskedDiffusionError(f"masked.eps: the smallest mask rate must be in (0, 1), got {eps!r}; "
                                   "e.g. 1e-3")
    return float(eps)


ESTIMATORS = ("count", "time")


def check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise MaskedDiffusionError(f"masked.estimator: {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    return estimator


def check_conv_kernel(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 or (k and k % 2 == 0):
        raise MaskedDiffusionError(f"masked.conv_kernel: must be 0 (no convolution) or an odd width such as 5, "
                                   f"got {k!r}")
    return int(k)


class MaskedDiffusion:
    """Absorbing-state diffusion with the linear schedule alpha_t = 1 - t.

    >>> process = MaskedDiffusion(mask_id=V)                      # estimator="count"
    >>> loss = process.training_loss(net, x0, generator)
    >>> ids = process.sample(net, batch=4, length=100, steps=32, generator=generator)

    Two unbiased estimators of the same continuous-time NELBO per token (``estimator``):

    - "time": the papers' form, t ~ U(eps, 1), each token masked with probability t, loss
      (1/t) * sum over masked positions of -log p(x_i | x_t), over the length L.
    - "count" (default): t integrated out. Given t, the number n of masked positions is
      Binomial(L, t), and int_0^1 (1/t) C(L, n) t^n (1 - t)^(L - n) dt = 1/n, so the NELBO equals
      E_{n ~ U{1..L}} [ mean over n masked positions, a uniformly random set, of -log p(x_i | x_t) ]:
      the any-order autoregressive loss. No 1/t weight, no eps: every sequence's term is a plain
      mean, which makes a far less noisy gradient (pydoc, 120 s: bound 4.33 against 4.57 bits/char).
    """

    def __init__(self, mask_id: int, eps: float = 1e-3, estimator: str = "count"):
        self.mask_id = int(mask_id)
        self.eps = check_eps(eps)
        self.estimator = check_estimator(estimator)

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

    def mask_exactly(self, x0: torch.Tensor, n: torch.Tensor, generator: Optional[torch.Generator] = None,
                     among: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x0 (B, T) with exactly n[b] positions of row b, a uniformly random set, set to [MASK]; with
        `among` (B, T) bool, the set is drawn from row b's True positions only (n[b] at most their count)."""
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        if among is not None:
            u = torch.where(among, u, torch.full_like(u, 2.0))                 # the others rank last
        ranks = u.argsort(1).argsort(1)                                        # (B, T)
        return torch.where(ranks < n[:, None], torch.full_like(x0, self.mask_id), x0)

    def _masked_nll(self, denoise: Callable, x0: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """-log p(x0_i | x_t) summed over the masked positions of each row: (B,) nats."""
        logits = denoise(xt)                                                   # (B, T, V-1)
        nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")    # (B, T)
        return (nll * (xt == self.mask_id).to(nll.dtype)).sum(1)

    def weighted_nll(self, denoise: Callable, x0: torch.Tensor, t: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Time form: (1/t) * sum over masked positions of -log p(x0_i | x_t), per sequence: (B,) nats."""
        return self._masked_nll(denoise, x0, self.add_noise(x0, t, generator)) / t

    def count_nll(self, denoise: Callable, x0: torch.Tensor, n: torch.Tensor,
                  generator: Optional[torch.Generator] = None, among: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Count form: mean -log p(x0_i | x_t) over n[b] random masked positions of row b (drawn `among`
        its True positions when given; the rest stay visible): (B,) nats."""
        return self._masked_nll(denoise, x0, self.mask_exactly(x0, n, generator, among)) / n

    @staticmethod
    def stratified(u0: float, n: int) -> np.ndarray:
        """n low-discrepancy uniforms in [0, 1): one draw shifted over n even strata (MDLM's sampler)."""
        return (u0 + np.arange(n) / n) % 1.0

    def training_loss(self, denoise: Callable, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Continuous-time NELBO per token (either estimator), the batch's draws stratified."""
        B, T = x0.shape
        u0 = torch.rand(1, generator=generator, dtype=torch.float64, device=generator.device).item()
        u = torch.from_numpy(self.stratified(u0, B))
        if self.estimator == "count":
            n = (u * T).long().clamp_max(T - 1) + 1                              # U{1..T}
            return self.count_nll(denoise, x0, n.to(x0.device), generator).mean()
        t = (self.eps + (1 - self.eps) * u).float().to(x0.device)
        return self.weighted_nll(denoise, x0, t, generator).sum() / (B * T)

    # --- likelihood bound --------------------------------------------------

    @torch.no_grad()
    def bits_per_char_bound(self, denoise: Callable, ids: np.ndarray, block_size: int, *, stride: Optional[int] = None,
                            draws: int = 8, seed: int = 0, batch_size: int = 64) -> tuple[float, float]:
        """(upper bound on bits per character, its standard error) over a long id sequence.

        Windowed (stride None or block_size): the sequence is cut into windows of block_size ids
        (the last one shorter), each scored as one sample of the model. The bound is the
        continuous-time NELBO in its count form (class docstring), whatever estimator trained the
        model: for a window of length L, E_{n ~ U{1..L}} of the mean -log p over n masked
        positions. It bounds -log p of the model's sampler at K = L (one position a step, in a
        uniformly random order: the any-order autoregressive model), the tightest of its K-step
        samplers' bounds. Every window starts from nothing, as a sample does.

        Sliding (stride < block_size), the context a GPT is scored with (evaluation.text's
        model_bits_per_char): windows of block_size ids start every `stride` ids; the first scores
        all its positions as above, every later one only its ids no earlier window scored (the
        last `stride`), with the block_size - stride ids before them visible, never masked. By the
        chain rule the sum bounds -log p of the model's semi-autoregressive sampler: `stride`
        characters at a time, each segment unmasked one position a step in a random order given
        the text before it (block diffusion, Arriola et al. 2025, with the segment as the block):
        the way a long text is written by a model whose context is block_size.

        Either is estimated with `draws` draws of n per window, stratified over all windows x draws,
        from a fixed seed; the standard error treats the draws as independent (conservative).
        """
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            raise MaskedDiffusionError("ids: nothing to score")
        stride = block_size if stride is None else int(stride)
        if not 1 <= stride <= block_size:
            raise MaskedDiffusionError(f"stride: must be in 1..block_size={block_size}, got {stride}")
        if stride == block_size:   # windows side by side, each scored whole
            spans = [(i, min(i + block_size, len(ids)), i) for i in range(0, len(ids), block_size)]
        else:                      # (window start, window end, first id scored)
            L = min(block_size, len(ids))
            starts = list(range(0, len(ids) - L + 1, stride))
            if starts[-1] + L < len(ids):
                starts.append(len(ids) - L)                                    # the last window flush with the end
            spans = [(s, s + L, 0 if j == 0 else starts[j - 1] + L) for j, s in enumerate(starts)]
        rng = np.random.default_rng(seed)
        total = len(spans) * draws
        u = self.stratified(rng.random(), total)[rng.permutation(total)]      # stratified, shuffled
        gen = torch.Generator().manual_seed(seed)
        jobs = [(a, e, f, u[j * draws + d]) for j, (a, e, f) in enumerate(spans) for d in range(draws)]
        jobs.sort(key=lambda job: job[1] - job[0])                             # equal lengths batch together
        per_token, weights = [], []
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b:b + batch_size]
            for length in sorted({e - a for a, e, _, _ in chunk}):
                part = [job for job in chunk if job[1] - job[0] == length]
                x0 = torch.from_numpy(np.stack([ids[a:e] for a, e, _, _ in part]))   # (b, L)
                scored = [e - f for _, e, f, _ in part]                           # ids each window scores
                n = torch.tensor([min(int(v * k), k - 1) + 1 for (*_, v), k in zip(part, scored)])  # U{1..k}
                among = None
                if any(k < length for k in scored):                               # the visible context
                    among = torch.arange(length)[None, :] >= torch.tensor([length - k for k in scored])[:, None]
                per_token.extend(self.count_nll(denoise, x0, n, gen, among).double().tolist())
                weights.extend(scored)
        per_token, weights = np.asarray(per_token), np.asarray(weights, dtype=np.float64)
        bound = float((per_token * weights).sum() / weights.sum())             # each character weighs the same
        stderr = float(per_token.std(ddof=1) / math.sqrt(len(per_token))) if len(per_token) > 1 else 0.0
        ln2 = math.log(2)
        return bound / ln2, stderr / ln2

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
        prompt = torch.zeros(0, dtype=torch.long) if prompt is None else torch.as_tensor(prompt, dtype=torch.long)
        check_request(len(prompt), length, steps, temperature, top_k, self.mask_id)
        rand = rand or (lambda shape: torch.rand(shape, generator=generator, dtype=torch.float64))
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
