"""A class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023) with adaLN-Zero blocks.

    net = DiT(DiTConfig(patch_size=2, width=96, depth=4, heads=4), image_size=8, in_channels=1, num_classes=10)
    eps = net(x, t, y)   # x (B, C, H, W) f32, t (B,) int64 timesteps, y (B,) int64 labels -> eps (B, C, H, W)

The same call signature as the U-Net, so components/models/diffusion.py trains and samples it
unchanged. The image is cut into (H/p) * (W/p) patches of p x p pixels, each one a token with a
fixed 2-D sine-cosine position; the blocks are plain transformer blocks whose LayerNorms are
modulated (shift, scale) and whose residual branches are gated by a vector regressed from the
sum of a sinusoidal timestep embedding and a class embedding. Every modulation layer and the
output layer start at zero (adaLN-Zero), so each block starts as the identity and the network
predicts zero noise at initialisation. Class id ``num_classes`` is the null class used for
classifier-free guidance, as in the U-Net.

No data-dependent Python control flow on tensors, so the module exports to ONNX as is.
Layout after facebookresearch/DiT ``models.py``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import DiTConfig  # noqa: F401  (re-exported: the network's shape)
from components.errors import ConfigError


class DiTConfigError(ConfigError):
    """The DiT cannot be built with these settings; the message names the field."""


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)                  # (B, N, D) by (B, D)


# ---------------------------------------------------------------------------
#                  Embedding layers for timesteps and class labels
# ---------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Integer timesteps -> vectors: a sinusoidal embedding followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 128):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
        """(B,) -> (B, dim): cos and sin of t at geometrically spaced frequencies."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None, :]                            # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)         # (B, dim) for even dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; one extra row for the null class (classifier-free guidance).

    Label dropout is the diffusion process's job (GaussianDiffusion.training_loss swaps labels
    for the null class), so this is a plain lookup table.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)     # +1: the null class

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)                                        # (B, D)


# ---------------------------------------------------------------------------
#                                 Core DiT model
# ---------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention over all patches (no mask: every patch sees every other)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)                          # (B, h, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block with adaptive LayerNorm-Zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # adaLN-Zero: gates at 0, the block is the identity
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B, N, D) patch tokens, c (B, D) conditioning
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map from each token to its patch's pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))        # (B, N, p*p*C)


class DiT(nn.Module):
    """Class-conditional epsilon-prediction Diffusion Transformer.

    DiT(DiTConfig(patch_size=2, width=96, depth=4, heads=4), image_size=8, in_channels=1, num_classes=10)
    """

    def __init__(self, config: DiTConfig, image_size: int, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        p, width, heads = config.patch_size, config.width, config.heads
        if p < 1 or image_size % p != 0:
            raise DiTConfigError(f"dit.patch_size: {p} does not divide image_size {image_size}; "
                                 f"use a divisor of {image_size} (e.g. 1, 2 or 4 for 8x8 digits)")
        if width < 4 or width % 4 != 0:
            raise DiTConfigError(f"dit.width: must be a positive multiple of 4 (2-D sine-cosine "
                                 f"positions), got {width}")
        if heads < 1 or width % heads != 0:
            raise DiTConfigError(f"dit.heads: {heads} heads do not divide dit.width {width}")
        if config.depth < 1:
            raise DiTConfigError(f"dit.depth: must be at least 1 block, got {config.depth}")
        if not config.mlp_ratio > 0:
            raise DiTConfigError(f"dit.mlp_ratio: must be > 0, got {config.mlp_ratio}")
        self.config, self.image_size = config, image_size
        self.in_channels, self.out_channels, self.num_classes = in_channels, in_channels, num_classes
        self.patch_size = p
        self.grid = image_size // p                                             # patches per side

        self.x_embedder = nn.Conv2d(in_channels, width, kernel_size=p, stride=p)  # patchify + linear embed
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        # fixed (not learned) positions, rebuilt from the config rather than stored with the weights
        pos = get_2d_sincos_pos_embed(width, self.grid)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float()[None], persistent=False)  # (1, N, D)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(width, p, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        # patch embedding like a linear layer (xavier over the flattened kernel)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero modulation, so every block starts as the identity
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # zero output layer: the network predicts zero noise at init
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C) pixel patches in raster order (the inverse of unpatchify)."""
        B, C, H, W = x.shape
        p, g = self.patch_size, self.grid
        x = x.reshape(B, C, g, p, g, p)
        x = torch.einsum("nchpwq->nhwpqc", x)                                  # (B, g, g, p, p, C)
        return x.reshape(B, g * g, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, g, c = self.patch_size, self.grid, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)                                  # (B, C, g, p, g, p)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), t (B,) int64, y (B,) int64 with num_classes = null class
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed    # (B, N, D), N = (H/p)^2
        c = self.t_embedder(t) + self.y_embedder(y)                            # (B, D)
        for block in self.blocks:
            h = block(h, c)                                                    # (B, N, D)
        h = self.final_layer(h, c)                                             # (B, N, p*p*C)
        return self.unpatchify(h)                                              # (B, C, H, W)


# ---------------------------------------------------------------------------
#                      Sine/cosine positional embedding (2-D)
# ---------------------------------------------------------------------------

def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): sin then cos at embed_dim / 2 frequencies."""
    omega = 1.0 / 10_000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)    # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim): half the channels encode the row, half the column."""
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows),
                           get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols)], axis=1)


# ---------------------------------------------------------------------------
#                                   DiT configs
# ---------------------------------------------------------------------------

# Named sizes for small images (params.yaml can give any shape; these are starting points).
# Parameters and training FLOPs per image on 8x8 digits (the U-Net: 0.65M, 90 MFLOPs).
DiT_configs: dict[str, DiTConfig] = {
    "DiT-T/1": DiTConfig(patch_size=1, width=64, depth=6, heads=4),    # 0.47M, 114 MFLOPs: one token per pixel
    "DiT-S/1": DiTConfig(patch_size=1, width=96, depth=4, heads=4),    # 0.71M, 172 MFLOPs
    "DiT-S/2": DiTConfig(patch_size=2, width=96, depth=4, heads=4),    # 0.71M, 44 MFLOPs: digits-dit
    "DiT-B/2": DiTConfig(patch_size=2, width=192, depth=6, heads=6),   # 4.1M
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
