"""Masked diffusion LM: the masking schedule, the ELBO, K-step sampling, bad settings."""
import itertools
import math
from typing import Optional

import numpy as np
import pytest
import torch

from components.config import GPTConfig
from components.models.mdlm import (
    MaskedDiffusion,
    MaskedDiffusionError,
    MaskedLM,
    check_steps,
    draw_tokens,
    unmask_counts,
)

V = 6                     # 5 real tokens + [MASK]
MASK = V - 1


def tiny_net(block_size: int = 16, seed: int = 0, conv_kernel: int = 3) -> MaskedLM:
    torch.manual_seed(seed)
    return MaskedLM(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size), V, conv_kernel=conv_kernel)


class CountingNet:
    """Wraps a network and records what each call saw."""

    def __init__(self, net):
        self.net, self.inputs = net, []

    def __call__(self, ids):
        self.inputs.append(ids.clone())
        return self.net(ids)


# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("conv_kernel", [0, 3])
def test_logits_cover_every_token_but_mask_and_attention_is_bidirectional(conv_kernel):
    net = tiny_net(conv_kernel=conv_kernel).eval()
    ids = torch.tensor([[0, 1, 2, MASK, 4, 3]])
    logits = net(ids)
    assert logits.shape == (1, 6, V - 1) and net.mask_id == MASK
    later = ids.clone()
    later[0, -1] = 0                                           # change the last token only
    assert not torch.allclose(net(later)[0, 0], logits[0, 0])  # the first position sees it: not causal
    with pytest.raises(MaskedDiffusionError, match=r"^input: 17 tokens exceed the context block_size=16"):
        net(torch.zeros(1, 17, dtype=torch.long))


# ---------------------------------------------------------------------------
# Forward process and loss
# ---------------------------------------------------------------------------

def test_masking_schedule_endpoints_and_middle():
    process = MaskedDiffusion(MASK, eps=1e-3)
    x0 = torch.randint(0, MASK, (4, 500), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(process.add_noise(x0, torch.zeros(4), gen), x0)                       # t=0: nothing masked
    assert (process.add_noise(x0, torch.ones(4), gen) == MASK).all()                       # t=1: all masked
    xt = process.add_noise(x0, torch.tensor([0.25, 0.25, 0.75, 0.75]), gen)
    share = (xt == MASK).float().mean(1)
    assert torch.allclose(share, torch.tensor([0.25, 0.25, 0.75, 0.75]), atol=0.05)
    assert torch.equal(xt[xt != MASK], x0[xt != MASK])                                       # the rest unchanged


def test_the_elbo_is_finite_and_falls_when_trained_on_a_tiny_string():
    text = np.array([0, 0, 0, 1] * 12)                                        # "aaab" repeated
    x0 = torch.from_numpy(np.stack([text[o:o + 16] for o in range(8)]))       # (8, 16), every phase
    net = tiny_net()
    process = MaskedDiffusion(MASK, eps=1e-3)

    def bound() -> float:
        bpc, stderr = process.bits_per_char_bound(net.eval(), text[:32], 16, draws=16, seed=0)
        assert math.isfinite(bpc) and math.isfinite(stderr) and stderr >= 0
        return bpc

    before = bound()
    assert before == bound()                                                  # fixed seed: the same number
    assert 0.5 * math.log2(V - 1) < before < 2 * math.log2(V - 1)             # about uniform at init
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net.train()
    losses = []
    for step in range(80):
        loss = process.training_loss(net, x0, torch.Generator().manual_seed(step))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert bound() < 0.5 * before


def test_training_loss_weights_masked_positions_by_one_over_t():
    """With a network that predicts uniformly, every masked token costs log(V-1) nats: E[(1/t) t L log V'] / L."""
    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, V - 1)

    x0 = torch.zeros(256, 64, dtype=torch.long)
    time_form = MaskedDiffusion(MASK, eps=1e-3, estimator="time")
    loss = time_form.training_loss(Uniform(), x0, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(V - 1), rel=0.03)
    # the count form has no 1/t weight: every term is a mean of equal costs, so it is exact
    loss = MaskedDiffusion(MASK).training_loss(Uniform(), x0, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(V - 1), rel=1e-6)
    bpc, _ = MaskedDiffusion(MASK).bits_per_char_bound(Uniform(), np.zeros(4096, dtype=np.int64), 64, draws=4)
    assert bpc == pytest.approx(math.log2(V - 1), rel=1e-6)


def test_mask_exactly_masks_n_uniformly_chosen_positions_per_row():
    process = MaskedDiffusion(MASK)
    x0 = torch.randint(0, MASK, (16000, 8), generator=torch.Generator().manual_seed(0))
    n = torch.arange(16000) % 8 + 1                                            # 1..8, all masked at 8
    xt = process.mask_exactly(x0, n, torch.Generator().manual_seed(1))
    assert torch.equal((xt == MASK).sum(1), n)
    assert torch.equal(xt[xt != MASK], x0[xt != MASK])
    share = (xt[n == 2] == MASK).float().mean(0)                              # each position alike: 2/8
    assert torch.allclose(share, torch.full((8,), 0.25), atol=0.05)   # 5 sd


def exact_nelbo_per_token(net, x0: torch.Tensor, scored: Optional[list[int]] = None) -> float:
    """The continuous-time NELBO of one short sequence by enumerating every masked set:
    (1/L) * sum over n of E_{|S| = n} [mean over S of -log p(x_i | x_S masked)] (nats per token).
    With `scored`, the sets are drawn from those positions only (the others stay visible) and the
    mean is over them: the bound of that segment given the rest."""
    L = x0.numel()
    scored = list(range(L)) if scored is None else scored
    total = 0.0
    with torch.no_grad():
        for n in range(1, len(scored) + 1):
            sets = list(itertools.combinations(scored, n))
            xt = x0.repeat(len(sets), 1)
            for row, S in enumerate(sets):
                xt[row, list(S)] = MASK
            nll = torch.nn.functional.cross_entropy(net(xt).transpose(1, 2), x0.repeat(len(sets), 1),
                                                    reduction="none")
            total += float(((nll * (xt == MASK)).sum(1) / n).mean())
    return total / len(scored)


def test_both_estimators_and_the_bound_agree_with_the_exact_elbo():
    """The count form integrates t out: its mean must equal the time form's (and the exact value)."""
    net = tiny_net(block_size=5, seed=4).eval()
    with torch.no_grad():                                                     # make the network far from uniform
        net.lm_head.weight.mul_(40)
    x0 = torch.tensor([[0, 3, 1, 4, 2]])
    exact = exact_nelbo_per_token(net, x0)
    batch = x0.repeat(20000, 1)
    with torch.no_grad():
        count = MaskedDiffusion(MASK).training_loss(net, batch, torch.Generator().manual_seed(0)).item()
        time_ = MaskedDiffusion(MASK, eps=1e-4, estimator="time").training_loss(
            net, batch, torch.Generator().manual_seed(0)).item()
    assert count == pytest.approx(exact, rel=0.01)
    assert time_ == pytest.approx(exact, rel=0.05)                            # noisier: the 1/t weight
    bpc, stderr = MaskedDiffusion(MASK).bits_per_char_bound(net, np.tile(x0[0].numpy(), 400), 5, draws=10)
    assert bpc == pytest.approx(exact / math.log(2), rel=0.02) and stderr > 0
    assert exact > 1.2 * math.log(V - 1) or exact < 0.8 * math.log(V - 1)    # a non-trivial check


def test_the_sliding_bound_is_the_chain_rule_of_segment_bounds_given_the_text_before():
    """Windows of 5 every 2 ids over 7 ids: ids 0-4 scored as one window, then 5-6 with ids 2-4 visible."""
    net = tiny_net(block_size=5, seed=4).eval()
    with torch.no_grad():
        net.lm_head.weight.mul_(40)
    ids = np.array([0, 3, 1, 4, 2, 2, 0])
    first = exact_nelbo_per_token(net, torch.from_numpy(ids[:5])[None])                  # per token, 5 ids
    second = exact_nelbo_per_token(net, torch.from_numpy(ids[2:7])[None], scored=[3, 4])  # ids 5, 6 given 2-4
    exact = (5 * first + 2 * second) / 7 / math.log(2)
    process = MaskedDiffusion(MASK)
    bpc, stderr = process.bits_per_char_bound(net, ids, 5, stride=2, draws=4000, seed=0)
    assert bpc == pytest.approx(exact, rel=0.02) and stderr > 0
    alone = exact_nelbo_per_token(net, torch.from_numpy(ids[5:7])[None])
    assert abs(second - alone) > 0.05 * alone                                  # a non-trivial check: context counts
    windowed, _ = process.bits_per_char_bound(net, ids, 5, draws=4000, seed=0)
    assert windowed == process.bits_per_char_bound(net, ids, 5, stride=5, draws=4000, seed=0)[0]
    with pytest.raises(MaskedDiffusionError, match="stride: must be in 1..block_size=5"):
        process.bits_per_char_bound(net, ids, 5, stride=0)


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

def test_unmask_counts_sum_to_the_length_and_empty_the_mask_at_the_end():
    assert unmask_counts(10, 10) == [1] * 10
    assert unmask_counts(10, 1) == [10]
    assert sum(unmask_counts(117, 32)) == 117 and sum(unmask_counts(5, 8)) == 5
    # the expected share: about (t - s)/t of the masked ones, so early steps unmask few, late ones many
    counts = unmask_counts(100, 4)
    assert counts == [25, 25, 25, 25]


@pytest.mark.parametrize("steps", [12, 1, 5, 40])
def test_sampling_leaves_no_mask_and_keeps_the_prompt(steps):
    net = CountingNet(tiny_net().eval())
    process = MaskedDiffusion(MASK, eps=1e-3)
    prompt = torch.tensor([3, 1, 4])
    out = process.sample(net, 3, 12, steps, prompt=prompt, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 15) and not (out == MASK).any()
    assert (out[:, :3] == prompt).all() and out.max() < MASK
    assert len(net.inputs) == min(steps, 12)                  # K calls; steps that unmask nothing are skipped
    masked = [int((x[0] == MASK).sum()) for x in net.inputs]
    assert masked[0] == 12 and masked == sorted(masked, reverse=True)
    if steps == 12:                                           # K = length: one position per step
        assert masked == list(range(12, 0, -1))


def test_sampling_is_reproducible_and_seeds_differ():
    net = tiny_net().eval()
    process = MaskedDiffusion(MASK, eps=1e-3)
    a = process.sample(net, 2, 10, 4, generator=torch.Generator().manual_seed(0))
    b = process.sample(net, 2, 10, 4, generator=torch.Generator().manual_seed(0))
    c = process.sample(net, 2, 10, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_draw_tokens_follows_the_distribution_temperature_and_top_k():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]]))
    u = torch.tensor([[0.05], [0.15], [0.5], [0.99]], dtype=torch.float64).view(4)
    assert draw_tokens(logits.expand(4, 3), u).tolist() == [0, 1, 2, 2]
    assert draw_tokens(logits.expand(4, 3), u, top_k=1).tolist() == [2, 2, 2, 2]
    assert draw_tokens(logits.expand(4, 3), u, temperature=1e-3).tolist() == [2, 2, 2, 2]


# ---------------------------------------------------------------------------
# Bad settings: one line before any work
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_a_mask_rate_outside_zero_one_is_refused(eps):
    with pytest.raises(MaskedDiffusionError, match=r"^masked.eps: ") as e:
        MaskedDiffusion(MASK, eps=eps)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


@pytest.mark.parametrize("kernel", [-1, 2, 4, 2.5, True])
def test_an_even_or_negative_convolution_width_is_refused(kernel):
    with pytest.raises(MaskedDiffusionError, match=r"^masked.conv_kernel: must be 0 \(no convolution\) or an odd"):
        MaskedLM(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), V, conv_kernel=kernel)


def test_an_unknown_estimator_is_refused():
    with pytest.raises(MaskedDiffusionError, match=r"^masked.estimator: 'binomial' is not one of count, time"):
        MaskedDiffusion(MASK, estimator="binomial")


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_k_below_one_is_refused_before_any_network_call(steps):
    net = CountingNet(tiny_net())
    with pytest.raises(MaskedDiffusionError, match=r"^sample.steps: K"):
        MaskedDiffusion(MASK).sample(net, 1, 4, steps)
    assert net.inputs == []
    with pytest.raises(ValueError):
        check_steps(steps)
