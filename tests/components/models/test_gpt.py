"""The GPT: causal mask, KV cache equal to a full forward pass, generation's preallocated cache and sliding
window, overfitting, sampling errors."""
import pytest
import torch

from components.models.gpt import GPT, ContextLengthError, Decoder, GPTConfig, SamplingError


def tiny(block_size: int = 16, vocab_size: int = 11, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size), vocab_size).eval()


def test_changing_a_future_token_never_changes_earlier_logits():
    model = tiny()
    idx = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 11
    logits2, _ = model(changed)
    assert torch.allclose(logits[:, :7], logits2[:, :7], atol=1e-6)
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:], atol=1e-4)  # the change is seen from there on


def test_cached_decoding_matches_a_full_forward_pass():
    model = tiny()
    idx = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(2))
    full, present = model(idx)
    assert present.shape == (2, 2, 3, 2, 16, 8)  # (n_layer, 2, B, n_head, T, head_dim)
    # prefill 5 tokens through an empty past, then decode one token at a time
    logits, past = model(idx[:, :5], model.empty_cache(3))
    steps = [logits]
    for t in range(5, 16):
        logits, past = model(idx[:, t:t + 1], past)
        steps.append(logits)
    cached = torch.cat(steps, dim=1)
    assert past.shape == present.shape
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(past, present, atol=1e-5, rtol=1e-4)


def test_no_past_and_empty_past_agree():
    model = tiny()
    idx = torch.randint(0, 11, (1, 9), generator=torch.Generator().manual_seed(3))
    a, _ = model(idx)
    b, _ = model(idx, model.empty_cache(1))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_greedy_generation_is_the_same_with_and_without_cache():
    model = tiny(block_size=8)
    prompt = torch.tensor([[1, 2, 3]])
    # 9 tokens: the last step already crops to the context (block_size=8) in both paths
    kw = dict(temperature=1.0, top_k=1)
    with_cache = model.generate(prompt, 6, use_cache=True, **kw)
    without = model.generate(prompt, 6, use_cache=False, **kw)
    assert with_cache.shape == (1, 9)
    assert torch.equal(with_cache[:, :9], without[:, :9])
    long = model.generate(prompt, 30, **kw)  # longer than the context: sliding window, no error
    assert long.shape == (1, 33)


def test_the_model_overfits_a_tiny_string():
    torch.manual_seed(0)
    text = "hello world, hello genflow. "
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text * 2])
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), len(chars)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = ids[None, :32], ids[None, 1:33]
    for _ in range(150):
        logits, _ = model(x, use_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, len(chars)), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    model.eval()
    out = model.generate(x[:, :6], 20, top_k=1)  # greedy continuation reproduces the string
    assert torch.equal(out[0, :26], ids[:26])


def test_weights_are_tied():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=12), "top_k"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_parameters_raise_one_clear_line(kwargs, name):
    model = tiny()
    with pytest.raises(SamplingError, match=f"^{name}:") as e:
        model.generate(torch.tensor([[1]]), 3, **kwargs)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_top_k_equal_to_the_vocabulary_is_allowed():
    assert tiny().generate(torch.tensor([[1]]), 3, top_k=11).shape == (1, 4)


def test_a_prompt_longer_than_the_context_is_refused():
    model = tiny(block_size=8)
    with pytest.raises(ContextLengthError, match="^prompt: 9 tokens.*block_size=8"):
        model.generate(torch.zeros(1, 9, dtype=torch.long), 2)
    with pytest.raises(ContextLengthError, match="^input:"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_top_k_one_sampling_is_deterministic_and_temperature_changes_randomness():
    model = tiny()
    prompt = torch.tensor([[4, 5]] * 8)
    a = model.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert (a == a[0]).all()  # greedy: every row the same
    b = model.generate(prompt, 5, temperature=50.0, generator=torch.Generator().manual_seed(0))
    assert not (b == b[0]).all()  # nearly uniform: rows differ


# ---------------------------------------------------------------------------
# Generation's cache: preallocated, written in place, same numbers as forward()
# ---------------------------------------------------------------------------

def perturbed(bias: bool, block_size: int = 16, scale: float = 0.05) -> GPT:
    """A tiny GPT whose biases and LayerNorm gains are not their initial 0 and 1 (so they count)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size, bias=bias), 11).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_the_decoder_gives_the_logits_and_cache_of_a_full_forward_pass(bias):
    model = perturbed(bias)
    idx = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(2))
    full, present = model(idx)  # (3, 16, 11), (n_layer, 2, B, nh, 16, hs)
    decoder = Decoder(model, 3)
    with torch.inference_mode():
        got = {4: decoder(idx[:, :5], 0)}  # prefill: the logits after its last token
        for t in range(5, 10):  # one token at a time
            got[t] = decoder(idx[:, t:t + 1], t)
        got[13] = decoder(idx[:, 10:14], 10)  # a chunk after a past: the explicit causal mask
        got[15] = decoder(idx[:, 14:16], 14)
    for t, logits in got.items():
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-4)
    # the cache, (n_layer, B, block, 2, nh, hs), holds forward()'s present keys and values
    torch.testing.assert_close(decoder.cache.permute(0, 3, 1, 4, 2, 5), present, atol=1e-5, rtol=1e-4)


def test_the_decoder_overwrites_its_cache_from_the_start_position():
    model = perturbed(False)
    idx = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(3))
    decoder = Decoder(model, 2)
    with torch.inference_mode():
        decoder(torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(4)), 0)  # fill it with others
        decoder(idx[:, :8], 0)  # a new prefill: positions 8.. are stale and must be ignored
        logits = decoder(idx[:, 8:9], 8)
    torch.testing.assert_close(logits, model(idx[:, :9])[0][:, -1], atol=1e-5, rtol=1e-4)


def test_the_decoder_refuses_more_than_the_context():
    decoder = Decoder(tiny(block_size=8), 1)
    with torch.inference_mode(), pytest.raises(ContextLengthError, match=r"^input: 6 cached \+ 3 new"):
        decoder(torch.zeros(1, 3, dtype=torch.long), 6)


def growing_cache_generate(model: GPT, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                           allowed_tokens=None):
    """generate(use_cache=True) as first written: the past grows by torch.cat through forward()."""
    block = model.config.block_size
    with torch.no_grad():
        logits, past = model(idx, model.empty_cache(idx.size(0)))
        for i in range(max_new_tokens):
            nxt = model._next_token(logits[:, -1], temperature, top_k, generator, allowed_tokens)
            idx = torch.cat([idx, nxt], dim=1)
            if i == max_new_tokens - 1:
                break
            if past.size(4) >= block:  # cache full: keep the most recent 3/4 of the context
                logits, past = model(idx[:, -max(1, block * 3 // 4):], model.empty_cache(idx.size(0)))
            else:
                logits, past = model(nxt, past)
    return idx


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=3), dict(allowed_tokens=6)])
def test_cached_generation_past_the_context_samples_what_the_growing_cache_did(kw):
    # large weights: the next token depends on the context, so a different window samples differently
    model = perturbed(True, block_size=8, scale=0.25)  # 3 + 30 tokens: the window slides (keeps 6 tokens) 5 times
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ours = model.generate(prompt, 30, generator=torch.Generator().manual_seed(5), **kw)
    ref = growing_cache_generate(model, prompt, 30, generator=torch.Generator().manual_seed(5), **kw)
    assert ours.shape == (2, 33)
    assert torch.equal(ours, ref)
    assert len(set(ours[0, 3:].tolist())) > 2  # really sampled: not one repeated token


def test_generate_returns_an_ordinary_tensor():
    model = tiny()
    out = model.generate(torch.tensor([[1, 2]]), 4)
    assert out.shape == (1, 6) and out.dtype == torch.long and not out.is_inference()
    out[0, 0] = 7  # callers may edit it (an inference tensor would refuse)
    assert torch.equal(model.generate(torch.tensor([[1, 2]]), 0), torch.tensor([[1, 2]]))


def test_the_inverse_cdf_draw_picks_the_first_token_whose_cdf_exceeds_the_uniform():
    model = tiny()
    logits = torch.randn(64, 11, generator=torch.Generator().manual_seed(6))
    logits[:, 3] = -float("inf")  # a token that can never be drawn (a flat step in the cdf)
    ours = model._next_token(logits, 1.0, None, torch.Generator().manual_seed(7), None)
    cdf = torch.softmax(logits, -1).cumsum(-1)
    u = torch.rand(64, 1, generator=torch.Generator().manual_seed(7)) * cdf[:, -1:]
    assert torch.equal(ours, (cdf <= u).sum(-1, keepdim=True).clamp(max=10))
    assert not (ours == 3).any()
