"""Text metrics: bits per character of a model, and character n-gram baselines.

A neural character model is only worth reporting next to an n-gram model fitted on
the same train split and scored on the same test split, so both live here.

- ``KneserNey``: interpolated Kneser-Ney over character ids (numpy, a second or two
  for a ~1 MB corpus at order 6). Absolute discount per order, D = n1 / (n1 + 2 n2);
  lower orders use continuation counts; the unigram level is interpolated with the
  uniform distribution over the whole vocabulary, so an unseen id (the tokenizer's
  unknown id) still gets a probability.
- ``ngram_baselines``: ``baseline/ngram{n}_bits_per_char`` for several orders.
- ``model_bits_per_char``: a GPT-style model over a long id sequence with a sliding
  window (see its docstring for what context each character gets).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from components.errors import ModelError

# ---------------------------------------------------------------------------
# n-gram baselines
# ---------------------------------------------------------------------------

def _gram_codes(ids: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """codes[i] = ids[i .. i+k-1] read as a base-V number; shape (len(ids) - k + 1,)."""
    n = len(ids) - k + 1
    codes = np.zeros(max(n, 0), dtype=np.int64)
    for j in range(k):
        codes = codes * vocab_size + ids[j:j + n]
    return codes


class _Table:
    """Counts of k-grams (raw or continuation) grouped by their (k-1)-context."""

    def __init__(self, gram_codes: np.ndarray, counts: np.ndarray, vocab_size: int):
        # gram_codes sorted unique (M,), counts (M,) > 0
        self.grams, self.counts = gram_codes, counts.astype(np.float64)
        ctx = gram_codes // vocab_size  # sorted, because grams are
        self.ctx, inv = np.unique(ctx, return_inverse=True)
        self.ctx_total = np.bincount(inv, weights=self.counts)  # sum_w c(h w)
        self.ctx_types = np.bincount(inv).astype(np.float64)     # N1+(h .)
        n1 = float((counts == 1).sum())
        n2 = float((counts == 2).sum())
        self.discount = n1 / (n1 + 2 * n2) if n1 > 0 else 0.5
        self.discount = min(max(self.discount, 0.05), 0.95)

    @staticmethod
    def _lookup(keys: np.ndarray, table: np.ndarray, values: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(table, keys)
        pos_c = np.minimum(pos, len(table) - 1)
        found = (pos < len(table)) & (table[pos_c] == keys)
        return np.where(found, values[pos_c], 0.0)

    def gram_count(self, codes: np.ndarray) -> np.ndarray:
        return self._lookup(codes, self.grams, self.counts)

    def context_stats(self, ctx_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (self._lookup(ctx_codes, self.ctx, self.ctx_total),
                self._lookup(ctx_codes, self.ctx, self.ctx_types))


class KneserNey:
    """Interpolated Kneser-Ney character model of a given order over ids 0..vocab_size-1.

        lm = KneserNey(train_ids, order=5, vocab_size=V)
        lm.bits_per_char(test_ids)        # mean -log2 p(x_i | previous order-1 ids)
        lm.next_probs(context_ids)        # (V,) distribution, sums to 1
    """

    def __init__(self, train_ids: np.ndarray, order: int, vocab_size: int):
        if order < 1:
            raise ModelError(f"order: must be >= 1, got {order}")
        if vocab_size ** order >= 2 ** 62:
            raise ModelError(f"order: {order} with a vocabulary of {vocab_size} overflows int64 codes; "
                             "use a lower order")
        ids = np.asarray(train_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ModelError(f"train_ids: values must be in 0..{vocab_size - 1}")
        self.order, self.V = order, vocab_size
        self.tables: list[_Table] = []  # tables[k-1]: k-gram counts used at level k
        for k in range(1, order + 1):
            if k == order:  # the top order uses raw counts
                grams, counts = np.unique(_gram_codes(ids, k, vocab_size), return_counts=True)
            else:  # lower orders: continuation counts N1+(. g), distinct left extensions
                longer = np.unique(_gram_codes(ids, k + 1, vocab_size))
                grams, counts = np.unique(longer % (vocab_size ** k), return_counts=True)
            self.tables.append(_Table(grams, counts, vocab_size))

    def _probs(self, ctx: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """p(nxt | ctx) for M queries; ctx (M, order-1) ids, -1 where the history is shorter."""
        V = self.V
        M = len(nxt)
        p = np.full(M, 1.0 / V)  # level 0: uniform
        ctx_code = np.zeros(M, dtype=np.int64)
        valid = np.ones(M, dtype=bool)  # the history is long enough for this level
        for k in range(1, self.order + 1):
            t = self.tables[k - 1]
            if k > 1:
                h = ctx[:, self.order - k]  # the id just before this level's context
                valid &= h >= 0
                ctx_code = np.where(valid, np.maximum(h, 0) * V ** (k - 2) + ctx_code, 0)
            gram = ctx_code * V + nxt
            c_hw = t.gram_count(gram)
            c_h, types_h = t.context_stats(ctx_code)
            seen = valid & (c_h > 0)
            safe = np.where(seen, c_h, 1.0)
            p_k = (np.maximum(c_hw - t.discount, 0.0) + t.discount * types_h * p) / safe
            p = np.where(seen, p_k, p)  # unseen context: back off entirely
        return p

    def _contexts(self, ids: np.ndarray, start: int = 0) -> np.ndarray:
        """(N, order-1) histories of ids[start:], padded with -1 before the first id."""
        n = self.order - 1
        padded = np.concatenate([np.full(n, -1, dtype=np.int64), ids])
        N = len(ids) - start
        if n == 0:
            return np.zeros((N, 0), np.int64)
        return np.stack([padded[start + j:start + j + N] for j in range(n)], axis=1)

    def bits_per_char(self, ids: np.ndarray) -> float:
        """Mean -log2 p over ids; the first ids use the shorter history they have."""
        ids = np.asarray(ids, dtype=np.int64)
        p = self._probs(self._contexts(ids), ids)
        return float(-np.log2(p).mean())

    def next_probs(self, context: Iterable[int]) -> np.ndarray:
        """(V,) distribution of the next id after ``context`` (its last order-1 ids count)."""
        n = self.order - 1
        hist = [int(c) for c in context][-n:] if n else []
        hist = [-1] * (n - len(hist)) + hist
        ctx = np.tile(np.array(hist, dtype=np.int64), (self.V, 1)).reshape(self.V, n)
        return self._probs(ctx, np.arange(self.V, dtype=np.int64))


def ngram_baselines(train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int,
                    orders: Iterable[int] = (1, 2, 3, 4, 5, 6)) -> dict[str, float]:
    """``{"baseline/ngram{n}_bits_per_char": ...}`` for each order, fitted on train, scored on test."""
    return {f"baseline/ngram{n}_bits_per_char": KneserNey(train_ids, n, vocab_size).bits_per_char(test_ids)
            for n in orders}


# ---------------------------------------------------------------------------
# Model bits per character
# ---------------------------------------------------------------------------

SLIDING_STRIDE_DIVISOR = 4   # bits/char windows start every block_size // 4 characters


def sliding_stride(block_size: int) -> int:
    """The stride of the sliding windows every text model is scored with: block_size // 4 (at least 1)."""
    return max(1, block_size // SLIDING_STRIDE_DIVISOR)


def model_bits_per_char(model, ids: np.ndarray, block_size: int, *, stride: int | None = None,
                        batch_size: int = 32) -> float:
    """Mean -log2 p(x_i | context) of a next-token model over ``ids``.

    Sliding window: windows of ``block_size`` ids start every ``stride`` ids (default
    block_size // 4); the first window scores all its positions, every later window
    scores only its last ``stride`` positions. Each id is scored once, and every id after
    the first window sees at least ``block_size - stride`` previous ids (96 of 128 by
    default), so the number measures the model with (nearly) full context, not the
    short-context start of each window. ``model(idx, use_cache=False)`` must return
    (logits (B, T, V), _).
    """
    import torch
    import torch.nn.functional as F

    ids = np.asarray(ids, dtype=np.int64)
    stride = stride or sliding_stride(block_size)
    if not 1 <= stride <= block_size:
        raise ModelError(f"stride: must be in 1..block_size={block_size}, got {stride}")
    if len(ids) < 2:
        raise ModelError("ids: need at least 2 ids to score")
    # Window w covers inputs ids[s : s+T] and targets ids[s+1 : s+T+1].
    T = min(block_size, len(ids) - 1)
    starts = list(range(0, len(ids) - 1 - T + 1, stride))
    if starts[-1] + T < len(ids) - 1:
        starts.append(len(ids) - 1 - T)  # last window flush with the end
    data = torch.from_numpy(ids)
    total_nats, total_n = 0.0, 0
    scored_to = 0  # targets before this index (into ids[1:]) are already scored
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in range(0, len(starts), batch_size):
            chunk = starts[b:b + batch_size]
            x = torch.stack([data[s:s + T] for s in chunk])          # (B, T)
            y = torch.stack([data[s + 1:s + T + 1] for s in chunk])  # (B, T)
            logits, _ = model(x, use_cache=False)                    # (B, T, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                  reduction="none").view(len(chunk), T)
            for row, s in enumerate(chunk):
                first = max(scored_to - s, 0)  # skip targets an earlier window scored
                total_nats += float(nll[row, first:].sum())
                total_n += T - first
                scored_to = s + T
    model.train(was_training)
    assert total_n == len(ids) - 1, (total_n, len(ids))
    return total_nats / total_n / math.log(2)
