"""The encoder-decoder transformer: shapes, masking, the caches, greedy / beam decoding."""
import pytest
import torch
import torch.nn.functional as F

from components.config import EncDecConfig
from components.models import gpt
from components.models.encdec import ContextLengthError, EncDec, SamplingError

V, BOS, EOS = 12, 10, 9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EncDec(EncDecConfig(n_layer_enc=2, n_layer_dec=2, n_head=2, n_embd=16, source_len=10, target_len=12),
                  V).eval()


def seq_logprob(model, src, ids):
    """log p(ids + EOS | src) under teacher forcing."""
    tgt_in = torch.tensor([[BOS] + ids])
    logp = F.log_softmax(model(src, tgt_in)[0], -1)
    return float(sum(logp[t, tok] for t, tok in enumerate(ids + [EOS])))


def test_it_is_built_from_the_gpt_blocks(model):
    assert all(isinstance(b, gpt.Block) for b in model.encoder)
    assert all(isinstance(b.attn, gpt.SelfAttention) and isinstance(b.mlp, gpt.MLP) for b in model.decoder)
    assert not model.encoder[0].attn.causal and model.decoder[0].attn.causal


def test_shapes(model):
    src, tgt = torch.randint(0, 9, (3, 7)), torch.randint(0, 9, (3, 5))
    cross = model.encode(src)
    assert cross.shape == (2, 2, 3, 2, 7, 8)   # (L_dec, k/v, B, nh, S, hs)
    logits, past = model.decode(tgt, cross)
    assert logits.shape == (3, 5, V) and past.shape == (2, 2, 3, 2, 5, 8)
    assert torch.allclose(model(src, tgt), logits, atol=1e-6)


def test_a_decoder_position_never_sees_later_targets(model):
    src = torch.randint(0, 9, (1, 6))
    a, b = torch.randint(0, 9, (1, 6)), torch.randint(0, 9, (1, 6))
    b[:, :3] = a[:, :3]
    la, lb = model(src, a), model(src, b)
    assert torch.allclose(la[:, :3], lb[:, :3], atol=1e-6) and not torch.allclose(la[:, 3:], lb[:, 3:])


def test_cross_attention_is_used_and_padding_is_masked(model):
    tgt = torch.randint(0, 9, (1, 4))
    s1, s2 = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(model(s1, tgt), model(s2, tgt), atol=1e-4)   # the source changes the output
    padded = torch.tensor([[1, 2, 3, 4, 0, 0]])
    mask = torch.tensor([[True] * 4 + [False] * 2])
    assert torch.allclose(model(padded, tgt, mask), model(s1, tgt), atol=1e-5)   # padding is invisible


def test_cached_decoding_equals_recomputing(model):
    src = torch.randint(0, 9, (2, 5))
    tgt = torch.cat([torch.full((2, 1), BOS), torch.randint(0, 9, (2, 6))], dim=1)
    full = model(src, tgt)
    cross, past, steps = model.encode(src), None, []
    for t in range(tgt.size(1)):
        logits, past = model.decode(tgt[:, t:t + 1], cross, None, past)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # a chunk after a past (the ONNX graph's general case) uses the explicit mask
    _, past = model.decode(tgt[:, :3], cross)
    chunk, _ = model.decode(tgt[:, 3:], cross, None, past)
    assert torch.allclose(chunk, full[:, 3:], atol=1e-5)
    outs = [model.generate(src, None, BOS, EOS, 12, cache=c) for c in ("full", "self", "none")]
    assert outs[0] == outs[1] == outs[2]


def test_beam_width_one_is_greedy_and_wider_beams_score_at_least_as_well(model):
    torch.manual_seed(1)
    srcs = torch.randint(0, 9, (4, 6))
    greedy = model.generate(srcs, None, BOS, EOS, 12, allowed_tokens=EOS + 1)
    assert model.beam_search(srcs, None, BOS, EOS, 12, 1, allowed_tokens=EOS + 1) == greedy
    wide = model.beam_search(srcs, None, BOS, EOS, 12, 4, allowed_tokens=EOS + 1)
    for i in range(4):
        if len(greedy[i]) < 12 and len(wide[i]) < 12:   # both ended with EOS: comparable scores
            assert seq_logprob(model, srcs[i:i + 1], wide[i]) >= seq_logprob(model, srcs[i:i + 1], greedy[i]) - 1e-5


def test_bad_settings_are_one_line(model):
    with pytest.raises(ContextLengthError, match="source: 11 characters, longer than encdec.source_len=10"):
        model.encode(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(SamplingError, match="beam_width: must be >= 1"):
        model.beam_search(torch.zeros(1, 3, dtype=torch.long), None, BOS, EOS, 5, 0)
    with pytest.raises(SamplingError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), None, BOS, EOS, 13)


def test_sampling_is_reproducible_with_a_generator(model):
    src = torch.randint(0, 9, (3, 5))
    run = lambda: model.generate(src, None, BOS, EOS, 10, greedy=False,   # noqa: E731
                                 generator=torch.Generator().manual_seed(3))
    assert run() == run()
