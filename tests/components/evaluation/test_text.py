"""n-gram baselines normalise and improve with order; the sliding-window bits/char scores every id once."""
import math

import numpy as np
import pytest
import torch

from components.evaluation.text import KneserNey, model_bits_per_char, ngram_baselines
from components.tokenizer import CharTokenizer

TEXT = ("Return the number of items in the container. Return a new list of the items. "
        "Raise ValueError if the value is not present. ") * 20 + "Return the view of the list."


@pytest.fixture(scope="module")
def data():
    tok = CharTokenizer.from_text(TEXT)
    return tok, tok.encode(TEXT)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_ngram_probabilities_sum_to_one(data, order):
    tok, ids = data
    lm = KneserNey(ids, order, tok.vocab_size)
    for context in ([], ids[:3], ids[10:20], [tok.unk_id] * 4, tok.encode("zzRet")):
        p = lm.next_probs(context)
        assert p.shape == (tok.vocab_size,)
        assert (p > 0).all()  # even the unknown id and unseen characters
        assert p.sum() == pytest.approx(1.0, abs=1e-9)


def test_higher_orders_fit_the_train_text_better(data):
    tok, ids = data
    bits = [KneserNey(ids, n, tok.vocab_size).bits_per_char(ids) for n in range(1, 7)]
    assert all(a > b for a, b in zip(bits, bits[1:])), bits
    assert bits[0] < math.log2(tok.vocab_size)


def test_ngram_baselines_names_and_unknown_ids(data):
    tok, ids = data
    test = tok.encode("Return the items? Raise KeyError.")  # '?' 'K' 'y' are unknown
    out = ngram_baselines(ids, test, tok.vocab_size, orders=[1, 3])
    assert set(out) == {"baseline/ngram1_bits_per_char", "baseline/ngram3_bits_per_char"}
    assert all(np.isfinite(v) and v > 0 for v in out.values())


class _Bigram(torch.nn.Module):
    """A model whose logits depend only on the current id: its bits/char is exact to check."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (V, V) log-probs

    def forward(self, idx, use_cache=False):
        return self.table[idx], None


@pytest.mark.parametrize("stride", [None, 1, 3, 8])
def test_model_bits_per_char_scores_every_id_once(stride):
    g = torch.Generator().manual_seed(0)
    table = torch.log_softmax(torch.randn(5, 5, generator=g), dim=-1)
    ids = np.random.default_rng(0).integers(0, 5, size=103)
    expected = -table[ids[:-1], ids[1:]].mean().item() / math.log(2)
    got = model_bits_per_char(_Bigram(table), ids, block_size=8, stride=stride, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-6)
