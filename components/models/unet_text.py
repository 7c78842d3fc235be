"""A prompt-conditioned U-Net: ``(x [B,C,H,W], t [B] int64, prompt_ids [B,L] int64) -> eps [B,C,H,W]``.

The class-conditional U-Net of components/models/unet.py (the same blocks, built by it) with a
text encoder (components/models/textenc.py) in place of the class embedding, and cross-attention
blocks at its lower resolutions: after every residual block at ``cross_attention.from_level`` and
below (and in the middle), the image features attend to the encoded prompt (query from the
pixels, keys/values from the prompt's states, padding masked out). The prompt's masked mean,
projected, is added to the timestep embedding too (``cross_attention.pooled``).

    net = TextUNet(UNetConfig(), TextEncoderConfig(), CrossAttentionConfig(), image_size=8,
                   vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    eps = net(x, t, ids)                             # ids from PromptTokenizer.batch; [start] alone = null
    states, mask = net.text(ids)                     # encode once ...
    eps = net.denoise_states(x, t, states, mask)     # ... and denoise every step (the ONNX denoiser graph)

The empty prompt (the start id alone) is the null condition of classifier-free guidance; the
family (components/families/captions.py) trains it in p_uncond of the rows.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import CrossAttentionConfig, TextEncoderConfig, UNetConfig
from components.models.textenc import TextEncoder
from components.models.unet import UNet, UNetConfigError, timestep_embedding

__all__ = ["CrossAttention", "TextUNet", "UNetConfig", "TextEncoderConfig", "CrossAttentionConfig"]


class CrossAttention(nn.Module):
    """Image features attend to prompt states: GroupNorm -> multi-head attention -> zero-initialised
    projection, added to the input (the block starts as the identity)."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise UNetConfigError(f"cross_attention.heads: {heads} heads do not divide {channels} channels")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(context_dim, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = h.shape
        nh, hs = self.heads, C // self.heads
        q = self.q(self.norm(h).flatten(2).transpose(1, 2))                  # (B, HW, C)
        k, v = self.kv(states).chunk(2, dim=-1)                              # (B, L, C) each
        q = q.view(B, H * W, nh, hs).transpose(1, 2)                         # (B, nh, HW, hs)
        k = k.view(B, -1, nh, hs).transpose(1, 2)                            # (B, nh, L, hs)
        v = v.view(B, -1, nh, hs).transpose(1, 2)
        keys = mask[:, None, None, :].expand(B, 1, H * W, mask.shape[1])     # (B, 1, HW, L): one row per query
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)          # (B, nh, HW, hs)
        a = self.out(a.transpose(1, 2).reshape(B, H * W, C))                 # (B, HW, C)
        return h + a.transpose(1, 2).reshape(B, C, H, W)


class TextUNet(nn.Module):
    """Epsilon-prediction U-Net conditioned on a prompt through cross-attention."""

    def __init__(self, config: UNetConfig, textenc: TextEncoderConfig, cross: CrossAttentionConfig,
                 image_size: int, vocab_size: int, pad_id: int, in_channels: int = 1):
        super().__init__()
        self.config, self.cross_config = config, cross
        self.image_size, self.in_channels = image_size, in_channels
        self.unet = UNet(config, image_size=image_size, in_channels=in_channels, num_classes=0)
        self.unet.class_emb = None   # the prompt conditions this network, not a class
        self.text = TextEncoder(textenc, vocab_size, pad_id)
        levels = self.unet.block_levels()
        if not 0 <= cross.from_level < len(config.channels):
            raise UNetConfigError(f"cross_attention.from_level: {cross.from_level} is not a level of "
                                  f"unet.channels={list(config.channels)} (0..{len(config.channels) - 1})")
        self.attend_at = [i for i, (level, _) in enumerate(levels) if level >= cross.from_level]
        self.cross = nn.ModuleDict({str(i): CrossAttention(levels[i][1], textenc.n_embd, cross.heads, config.groups)
                                    for i in self.attend_at})
        self.pool = nn.Linear(textenc.n_embd, config.time_dim) if cross.pooled else None

    def denoise_states(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """eps for x (B, C, H, W) at t (B,) given encoded prompts: states (B, L, D), mask (B, L) bool."""
        emb = self.unet.time_mlp(timestep_embedding(t, self.config.time_dim))          # (B, E)
        if self.pool is not None:
            m = mask.unsqueeze(-1).to(states.dtype)                                     # (B, L, 1)
            emb = emb + self.pool((states * m).sum(1) / m.sum(1).clamp(min=1.0))       # masked mean (B, D)
        cross = self.cross

        def attend(i: int, h: torch.Tensor) -> torch.Tensor:
            return cross[str(i)](h, states, mask) if str(i) in cross else h
        return self.unet.run(x, emb, attend)

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        states, mask = self.text(prompt_ids)
        return self.denoise_states(x, t, states, mask)
