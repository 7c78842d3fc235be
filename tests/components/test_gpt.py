"""The GPT: causal mask, KV cache equal to a full forward pass, overfitting, sampling errors."""
import pytest
import torch

from components.models.gpt import GPT, ContextLengthError, GPTConfig, SamplingError


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
