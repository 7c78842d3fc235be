"""Metrics on pairs (components/evaluation/seq2seq.py) that need no trained model."""
from components.evaluation import seq2seq as metrics_of


def test_other_sources_keeps_every_target_and_moves_every_source():
    pairs = [(f"src{i}", f"tgt{i}") for i in range(7)]
    moved = metrics_of.other_sources(pairs)
    assert [t for _, t in moved] == [t for _, t in pairs]                      # targets in place
    assert sorted(s for s, _ in moved) == sorted(s for s, _ in pairs)          # a permutation of the sources
    assert all(s != f"src{i}" for i, (s, _) in enumerate(moved))               # none keeps its own
    assert metrics_of.other_sources(pairs[:2]) == [("src1", "tgt0"), ("src0", "tgt1")]
