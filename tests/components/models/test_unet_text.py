"""The prompt-conditioned U-Net: cross-attention reads the prompt, padding does not, the null prompt,
classifier-free guidance through digits-unet's process."""
import pytest
import torch

from components.config import CrossAttentionConfig, TextEncoderConfig, UNetConfig
from components.models.unet import UNetConfigError
from components.models.unet_text import TextUNet
from components.tokenizer import PromptTokenizer

VOCAB = " ,-acdefghiklnoprstuvwxz"
TEXT = TextEncoderConfig(n_layer=1, n_head=2, n_embd=16, context=24)


def tiny(pooled=False, seed=0):
    torch.manual_seed(seed)
    tok = PromptTokenizer(VOCAB, context=TEXT.context)
    net = TextUNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), TEXT,
                   CrossAttentionConfig(from_level=1, heads=2, pooled=pooled), image_size=8,
                   vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    for p in net.parameters():        # the zero-initialised outputs would hide every difference
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.05)
    return tok, net.eval()


def inputs(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([3, 7][:n])


def ids(tok, prompts, length=None):
    return torch.from_numpy(tok.batch(prompts, length)[0])


def test_cross_attention_sits_at_the_lower_resolutions_only():
    _, net = tiny()
    levels = net.unet.block_levels()
    assert [lv for lv, _ in levels] == [0, 1, 1, 1, 1, 1, 0, 0]   # down 8x8, down 4x4, mid x2, up 4x4 x2, up 8x8 x2
    assert net.attend_at == [1, 2, 3, 4, 5] and all(net.cross[str(i)].q.in_features == 16 for i in net.attend_at)
    with pytest.raises(UNetConfigError, match=r"^cross_attention.from_level: 2 is not a level of unet.channels"):
        TextUNet(UNetConfig(channels=[8, 16], time_dim=16, groups=4), TEXT, CrossAttentionConfig(from_level=2),
                 image_size=8, vocab_size=30, pad_id=29)


@pytest.mark.parametrize("pooled", [False, True])
def test_changing_the_prompt_changes_the_output_and_padding_does_not(pooled):
    tok, net = tiny(pooled=pooled)
    x, t = inputs()
    with torch.no_grad():
        a = net(x, t, ids(tok, ["a thick seven", "a thick seven"]))
        b = net(x, t, ids(tok, ["a thin seven", "a wide zero"]))
        padded = net(x, t, ids(tok, ["a thick seven", "a thick seven"], length=TEXT.context))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-5          # each row follows its own prompt
    torch.testing.assert_close(padded, a, atol=1e-6, rtol=0)        # padding to the context: same noise


def test_the_null_prompt_is_the_start_id_alone_and_its_padding_does_not_matter():
    tok, net = tiny()
    x, t = inputs()
    with torch.no_grad():
        null = net(x, t, ids(tok, ["", ""]))
        null_padded = net(x, t, ids(tok, ["", "a thick seven"]))[:1]   # row 0: [start] then padding
        cond = net(x, t, ids(tok, ["a thick seven", "a thick seven"]))
    assert ids(tok, [""]).tolist() == [[tok.start_id]]
    torch.testing.assert_close(null_padded, null[:1], atol=1e-6, rtol=0)
    assert (null - cond).abs().max() > 1e-5


def test_the_text_encoder_trains_with_the_unet():
    tok, net = tiny()
    x, t = inputs()
    net.train()
    net(x, t, ids(tok, ["a thick seven", "zero"])).square().mean().backward()
    assert net.text.wte.weight.grad is not None and net.text.wte.weight.grad.abs().sum() > 0
    assert net.unet.conv_in.weight.grad.abs().sum() > 0
    assert net.unet.class_emb is None   # no class embedding: the prompt is the condition


def test_guidance_scale_zero_is_the_null_prompt_and_one_differs():
    from components.families.captions import process

    tok, net = tiny()
    config = {"diffusion": {"timesteps": 10, "schedule": "cosine", "p_uncond": 0.1}}
    prompts = ["a thick seven", "a wide zero"]
    table = ids(tok, prompts + [""])                                   # row 2: the empty prompt
    states, mask = net.text(table)

    def denoise(x, t, rows):
        return net.denoise_states(x, t, states[rows], mask[rows])

    def draw(guidance, denoise=denoise):
        return process(config, 2).sample(denoise, torch.arange(2), (1, 8, 8), steps=4, guidance=guidance,
                                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g0, g1, g3 = draw(0.0), draw(1.0), draw(3.0)
        null_ids = ids(tok, ["", ""])
        only_null = draw(1.0, denoise=lambda x, t, rows: net(x, t, null_ids[rows]))
    torch.testing.assert_close(g0, only_null, atol=1e-6, rtol=0)      # scale 0: the null-prompt model
    assert (g1 - g0).abs().max() > 1e-5 and (g3 - g1).abs().max() > 1e-5
