"""Metrics of sequence transduction (source -> target pairs), shared by every model trained on pairs.

Names are the same for the encoder-decoder (pydoc-seq2seq) and the decoder-only GPT on the same
pairs (pydoc-pairs-gpt), so the MLflow UI and `genflow compare` put them side by side:

- ``eval/bits_per_char``: mean -log2 p(token | source, earlier target tokens) over the test
  targets' characters *and* their end marker (a model must also say where a target stops);
  ``bits_per_char(nats, tokens)`` turns a family's summed negative log-likelihood into it.
- ``eval/chrf``, ``eval/bleu``: sacrebleu's corpus chrF (character 6-grams, beta 2) and BLEU
  (13a tokenisation) of decoded targets against the references; ``eval/exact_match``: share of
  decoded targets equal to their reference.
- ``eval/bits_per_char_other_source``: the same test targets, each after another test pair's
  source (``other_sources``): the gap to ``eval/bits_per_char`` is what the model gets from
  reading its own source; near zero, it writes the same text whatever the source.
- ``baseline/retrieval_chrf``: chrF of the *retrieval* baseline: for each test source, the target
  of the training pair whose source is nearest by character n-grams (TF-IDF of 2- to 4-grams,
  cosine). A model that only memorised the training pairs cannot beat it.
- ``baseline/ngram{n}_bits_per_char``: interpolated Kneser-Ney over the target texts alone (no
  source), each followed by the end marker, fitted on train targets and scored on test targets:
  the bits a model must beat to show it uses the source at all.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from components.evaluation.text import KneserNey


def bits_per_char(total_nats: float, tokens: int) -> float:
    """Mean bits per target token (characters + end markers) from a summed negative log-likelihood."""
    return total_nats / max(tokens, 1) / math.log(2)


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """eval/chrf, eval/bleu (sacrebleu, corpus level, 0..100) and eval/exact_match (0..1)."""
    import sacrebleu

    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs) or not refs:
        raise ValueError(f"hypotheses: {len(hyps)} for {len(refs)} references; need one per reference")
    return {"eval/chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
            "eval/bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
            "eval/exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)]))}


def other_sources(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each target after the source of the pair half the list away (a fixed derangement for 2+ pairs):
    eval/bits_per_char_other_source - eval/bits_per_char is what reading the right source is worth."""
    n = len(pairs)
    return [(pairs[(i + max(1, n // 2)) % n][0], t) for i, (_, t) in enumerate(pairs)]


def nearest_train_targets(train: Sequence[tuple[str, str]], sources: Sequence[str]) -> list[str]:
    """For each source, the target of the training pair with the nearest source (char 2-4-gram TF-IDF, cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer="char", ngram_range=(2, 4), lowercase=False, sublinear_tf=True)
    train_m = vec.fit_transform([s for s, _ in train])             # (N, F), rows L2-normalised
    sims = vec.transform(list(sources)) @ train_m.T                # (M, N) cosine similarities
    best = np.asarray(sims.argmax(axis=1)).reshape(-1)             # first index on ties: deterministic
    return [train[i][1] for i in best]


def retrieval_baseline(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]]) -> dict[str, float]:
    """baseline/retrieval_chrf (and _bleu, _exact_match) of copying the nearest training pair's target."""
    guesses = nearest_train_targets(train, [s for s, _ in test])
    scores = text_scores(guesses, [t for _, t in test])
    return {f"baseline/retrieval_{k.split('/')[1]}": v for k, v in scores.items()}


def target_ids(targets: Iterable[str], tok) -> np.ndarray:
    """The targets as one id stream, each followed by the end marker (tok: a PairTokenizer)."""
    parts = [np.append(tok.encode(t), tok.eos_id) for t in targets]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def target_ngram_baselines(train_targets: Sequence[str], test_targets: Sequence[str], tok,
                           orders: Iterable[int] = (4,)) -> dict[str, float]:
    """baseline/ngram{n}_bits_per_char of the test targets under Kneser-Ney fitted on the train targets."""
    a, b = target_ids(train_targets, tok), target_ids(test_targets, tok)
    return {f"baseline/ngram{n}_bits_per_char": KneserNey(a, n, tok.vocab_size).bits_per_char(b) for n in orders}
