"""The prompt tokenizer and the text encoder: shapes, the padding mask, the null prompt, refusals,
ONNX export with onnxruntime parity."""
import numpy as np
import pytest
import torch

from components.config import ExportConfig, TextEncoderConfig
from components.errors import ModelError
from components.export import export_text_encoder
from components.models.encdec import EncDec, EncDecConfig
from components.models.gpt import ContextLengthError
from components.models.textenc import TextEncoder
from components.tokenizer import PromptError, PromptTokenizer, UnknownCharactersError

VOCAB = " ,-acdefghiklnoprstuvwxz"
TINY = TextEncoderConfig(n_layer=2, n_head=2, n_embd=32, context=24)


def tiny(seed=0):
    torch.manual_seed(seed)
    tok = PromptTokenizer(VOCAB, context=TINY.context)
    return tok, TextEncoder(TINY, tok.vocab_size, tok.pad_id).eval()


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def test_prompts_get_a_start_id_and_the_empty_prompt_is_the_null_condition():
    tok = PromptTokenizer(VOCAB, context=TINY.context)
    assert tok.vocab_size == len(VOCAB) + 3 and len({tok.unk_id, tok.start_id, tok.pad_id}) == 3
    ids = tok.encode_prompt("a thick seven")
    assert ids[0] == tok.start_id and tok.decode(ids[1:]) == "a thick seven"
    assert tok.encode_prompt("").tolist() == [tok.start_id]
    ids, mask = tok.batch(["a thick seven", "", "zero"])
    assert ids.shape == mask.shape == (3, 14) and ids.dtype == np.int64 and mask.dtype == bool
    assert mask.sum(1).tolist() == [14, 1, 5] and (ids[~mask] == tok.pad_id).all()
    fixed, _ = tok.batch(["zero"], length=TINY.context)
    assert fixed.shape == (1, TINY.context)


def test_unknown_characters_too_long_and_required_empty_prompts_are_refused_in_one_line():
    tok = PromptTokenizer(VOCAB, context=TINY.context)
    with pytest.raises(UnknownCharactersError) as e:
        tok.encode_prompt("a THICK seven!")
    msg = str(e.value)
    assert msg.startswith("prompt: 6 character(s) the text encoder does not know: 'T', 'H', 'I', 'C', 'K', '!'")
    assert "\n" not in msg and repr(VOCAB) in msg
    with pytest.raises(PromptError, match=r"^prompt: 24 characters, longer than the text encoder's context of 23; "):
        tok.encode_prompt("a" * 24)
    assert len(tok.encode_prompt("a" * 23)) == TINY.context   # exactly the context fits
    with pytest.raises(PromptError, match="^prompt: empty; give a caption"):
        tok.encode_prompt("  ", required=True)
    with pytest.raises(PromptError, match="length: 3, expected 5"):
        tok.batch(["zero"], length=3)
    assert isinstance(PromptError("x"), ModelError)


# ---------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------

def test_states_and_mask_shapes_and_padding_does_not_change_real_positions():
    tok, enc = tiny()
    prompts = ["a thick seven", "", "a wide, thin, upright zero"[:TINY.context - 1]]
    ids, mask = tok.batch(prompts)
    with torch.no_grad():
        states, got_mask = enc(torch.from_numpy(ids))
        assert states.shape == (3, ids.shape[1], TINY.n_embd) and states.dtype == torch.float32
        assert torch.equal(got_mask, torch.from_numpy(mask))
        assert torch.isfinite(states).all() and (states[~got_mask] == 0).all()
        more, _ = enc(torch.from_numpy(tok.batch(prompts, length=TINY.context)[0]))   # more padding
        for i, p in enumerate(prompts):   # each prompt alone, without any padding
            alone, _ = enc(torch.from_numpy(tok.batch([p])[0]))
            n = len(p) + 1
            torch.testing.assert_close(states[i, :n], alone[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(more[i, :n], alone[0], rtol=0, atol=1e-5)
        # the prompt reaches every position: changing one character changes the start's state too
        a, _ = enc(torch.from_numpy(tok.batch(["a thick seven"])[0]))
        b, _ = enc(torch.from_numpy(tok.batch(["a thick seven"[:-1] + "x"])[0]))
        assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4
        null, _ = enc(torch.from_numpy(tok.batch([""])[0]))
        assert null.shape == (1, 1, TINY.n_embd) and (null - a[:, :1]).abs().max() > 1e-4


def test_the_encoder_refuses_more_positions_than_its_context():
    tok, enc = tiny()
    with pytest.raises(ContextLengthError, match="longer than textenc.context=24"):
        enc(torch.full((1, TINY.context + 1), tok.start_id, dtype=torch.long))


def test_the_encoder_stack_is_the_encoder_decoders():
    """One home for the encoder stack: EncDec.encode and the text encoder both run encdec.run_encoder,
    and EncDec's encoding is unchanged by sharing it (same numbers as the blocks run by hand)."""
    torch.manual_seed(0)
    net = EncDec(EncDecConfig(n_layer_enc=1, n_layer_dec=1, n_head=2, n_embd=16, source_len=8, target_len=8), 11).eval()
    src = torch.randint(0, 11, (2, 6))
    mask = torch.arange(6)[None, :] < torch.tensor([[6], [3]])
    with torch.no_grad():
        from components.models.gpt import rotary

        rope = rotary(torch.arange(6), net.inv_freq)
        x = net.wte(src.reshape(-1))
        for block in net.encoder:
            x, _, _ = block(x, rope, None, mask[:, None, None, :])
        memory = net.ln_enc(x).view(2, 6, -1)
        want = torch.stack([blk.cross.memory_kv(memory) for blk in net.decoder])
        torch.testing.assert_close(net.encode(src, mask), want, rtol=0, atol=0)
    _, enc = tiny()
    assert all(type(b).__name__ == "Block" and not b.attn.causal for b in enc.blocks)


# ---------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("exporter, opset", [("torchscript", 20), ("dynamo", 23)])   # 23: the fused Attention op
def test_onnx_export_matches_pytorch_on_onnxruntime(tmp_path, exporter, opset):
    import onnxruntime as ort

    tok, enc = tiny()
    path = tmp_path / "text_encoder.onnx"
    result = export_text_encoder(enc, tok, path, ExportConfig(), exporter=exporter, opset=opset)
    assert result["passed"], result.get("reason")
    assert result["exporter"] == exporter and result["opset"] == opset
    assert result["max_abs"] < 1e-4 and result["info"]["pad_id"] == tok.pad_id
    assert (tmp_path / "text_encoder_parity_inputs.npz").exists() and not (tmp_path / "parity_inputs.npz").exists()
    # a batch of real prompts, the null one included, on onnxruntime alone
    ids, mask = tok.batch(["a thick seven", "", "two"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    states, got_mask = sess.run(["states", "prompt_mask"], {"prompt_ids": ids})
    with torch.no_grad():
        want, _ = enc(torch.from_numpy(ids))
    np.testing.assert_array_equal(got_mask, mask)
    np.testing.assert_allclose(states, want.numpy(), rtol=0, atol=1e-4)


def test_the_tokenizer_of_a_captions_dataset_must_fit_its_longest_caption():
    manifest = {"name": "digits-captions", "kind": "captions", "vocab": VOCAB, "max_caption_chars": 59}
    tok = PromptTokenizer.for_dataset(manifest, 65)
    assert tok.vocab == VOCAB and tok.max_chars == 64
    with pytest.raises(ModelError, match=r"^textenc.context: 40 positions hold captions of up to 39 characters, "
                                         r"but datasets.digits-captions has one of 59; raise textenc.context to "
                                         r"at least 60"):
        PromptTokenizer.for_dataset(manifest, 40)
    with pytest.raises(ModelError, match="needs a captions dataset"):
        PromptTokenizer.for_dataset({"name": "digits", "kind": "image"}, 65)
