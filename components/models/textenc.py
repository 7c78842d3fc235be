"""The text encoder of prompt-conditioned models: a small transformer encoder over characters.

It is the encoder-decoder's encoder stack (components/models/encdec.py ``run_encoder``: GPT's
pre-norm blocks without the causal mask, rotary positions, a final LayerNorm), with an embedding
of its own over a ``PromptTokenizer``'s ids (characters, start, padding). No downloaded weights:
it is trained jointly with the model that reads it (the U-Net's cross-attention, the encoder-
decoder's decoder).

    tok = PromptTokenizer(vocab, context=65)
    enc = TextEncoder(TextEncoderConfig(), tok.vocab_size, tok.pad_id)
    ids, _ = tok.batch(["a thick seven", ""])           # the empty prompt is [start]: the null condition
    states, mask = enc(torch.from_numpy(ids))          # (B, L, D) float, (B, L) bool (True: real position)

Padding never changes the states of real positions: keys at padding are masked out, positions
count from the start id, and padding sits after the prompt. The states at padding are zero. Every
prompt has at least its start id, so no row of the key mask is empty (no NaN from attention).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from components.config import GPTConfig, TextEncoderConfig
from components.models.encdec import key_mask, run_encoder
from components.models.gpt import Block, ContextLengthError, init_gpt2_weights, inverse_frequencies, rotary

__all__ = ["TextEncoder", "TextEncoderConfig"]


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig, vocab_size: int, pad_id: int):
        super().__init__()
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id: {pad_id} is not an id of the vocabulary of {vocab_size}")
        if config.n_layer < 1 or config.context < 1:
            raise ValueError("textenc.n_layer / context: need at least one layer and one position")
        self.config, self.vocab_size, self.pad_id = config, vocab_size, pad_id
        bc = GPTConfig(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                       block_size=config.context, dropout=config.dropout, bias=config.bias)
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList([Block(bc, causal=False) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.register_buffer("inv_freq", inverse_frequencies(config.n_embd // config.n_head), persistent=False)
        init_gpt2_weights(self, config.n_layer)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) int64 -> states (B, L, n_embd) float (zero at padding), mask (B, L) bool."""
        B, L = ids.shape
        if not _tracing() and L > self.config.context:
            raise ContextLengthError(f"prompt: {L} positions, longer than textenc.context={self.config.context}")
        mask = ids != self.pad_id                                            # (B, L)
        rope = rotary(torch.arange(L, device=ids.device), self.inv_freq)
        x = self.drop(self.wte(ids.reshape(-1)))                             # (B*L, C)
        # (B, 1, L, L): onnxruntime's Attention op (opset 23) wants one mask row per query, no broadcast
        keys = key_mask(mask).expand(-1, -1, L, -1)
        x = run_encoder(self.blocks, self.ln_f, x, rope, keys).view(B, L, -1)   # (B, L, C)
        return x * mask.unsqueeze(-1).to(x.dtype), mask

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
