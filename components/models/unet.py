"""A class-conditional U-Net denoiser: ``(x [B,C,H,W], t [B] int64, y [B] int64) -> eps [B,C,H,W]``.

Contracting path (residual blocks, stride-2 convolutions), a middle, then an expansive path
(nearest upsampling + convolution) that concatenates the contracting path's activations
(skip connections). Each residual block sees the sum of a sinusoidal timestep embedding and
a class embedding; class id ``num_classes`` is the null class used for classifier-free
guidance. Shapes come from UNetConfig (params.yaml ``models.<key>.unet``).

No data-dependent Python control flow on tensors, so the module exports to ONNX as is.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import UNetConfig  # noqa: F401  (re-exported: the network's shape)
from components.errors import ConfigError


class UNetConfigError(ConfigError):
    """The U-Net cannot be built with these settings; the message names the field."""


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]                                # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)             # (B, dim) for even dim


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the embedding as a per-channel shift, twice; residual."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                                  # (B, c_out, H, W)
        h = h + self.emb(emb)[:, :, None, None]                                # add (B, c_out, 1, 1)
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)                                                    # (B, c, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, c, 2H, 2W)


class UNet(nn.Module):
    """Class-conditional epsilon-prediction U-Net.

    UNet(UNetConfig(channels=[32, 64]), image_size=8, in_channels=1, num_classes=10)
    """

    def __init__(self, config: UNetConfig, image_size: int, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        chans, groups = list(config.channels), config.groups
        if not chans:
            raise UNetConfigError("unet.channels: needs at least one entry, e.g. [32, 64]")
        halvings = len(chans) - 1
        if image_size % (2 ** halvings) != 0:
            raise UNetConfigError(
                f"unet.channels: {len(chans)} levels halve the image {halvings} times, but image_size "
                f"{image_size} is not divisible by {2 ** halvings}; use fewer channel entries or another image_size")
        bad = [c for c in chans if c % groups != 0]
        if bad:
            raise UNetConfigError(f"unet.groups: {groups} GroupNorm groups do not divide channel count {bad[0]} "
                                  f"(unet.channels={chans})")
        if config.time_dim % 2 != 0:
            raise UNetConfigError(f"unet.time_dim: must be even (sin/cos pairs), got {config.time_dim}")
        if config.blocks_per_level < 1:
            raise UNetConfigError(f"unet.blocks_per_level: must be at least 1, got {config.blocks_per_level}")
        self.config, self.image_size = config, image_size
        self.in_channels, self.num_classes = in_channels, num_classes
        emb_dim, nb, drop = config.time_dim, config.blocks_per_level, config.dropout

        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # +1: the null class for guidance
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)

        # contracting path: nb blocks per level, then halve (except at the last level)
        self.down = nn.ModuleList()
        skip_chans, c = [chans[0]], chans[0]
        for level, c_out in enumerate(chans):
            for _ in range(nb):
                self.down.append(ResBlock(c, c_out, emb_dim, groups, drop))
                c = c_out
                skip_chans.append(c)
            if level < halvings:
                self.down.append(Downsample(c))
                skip_chans.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, groups, drop), ResBlock(c, c, emb_dim, groups, drop)])

        # expansive path: nb+1 blocks per level, each eats one skip; double (except at the top)
        self.up = nn.ModuleList()
        for level, c_out in reversed(list(enumerate(chans))):
            for _ in range(nb + 1):
                self.up.append(ResBlock(c + skip_chans.pop(), c_out, emb_dim, groups, drop))
                c = c_out
            if level > 0:
                self.up.append(Upsample(c))

        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predict zero noise at init
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.time_dim)) + self.class_emb(y)  # (B, E)
        return self.run(x, emb)

    def run(self, x: torch.Tensor, emb: torch.Tensor,
            attend: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """The network on x (B, C, H, W) with the embedding emb (B, E). ``attend(i, h)``, if given, runs
        after the i-th residual block (down, middle, up in order; `block_levels` says at which level
        each sits): conditioning beyond the embedding, e.g. cross-attention to a prompt."""
        def after(i: int, h: torch.Tensor) -> torch.Tensor:
            return attend(i, h) if attend is not None else h

        h = self.conv_in(x)                                                    # (B, c0, H, W)
        skips, i = [h], 0
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h, i = after(i, layer(h, emb)), i + 1
            else:
                h = layer(h)
            skips.append(h)
        for block in self.mid:
            h, i = after(i, block(h, emb)), i + 1                              # (B, c_last, H/2^L, W/2^L)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h, i = after(i, layer(torch.cat([h, skips.pop()], dim=1), emb)), i + 1
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))                         # (B, C, H, W)

    def block_levels(self) -> list[tuple[int, int]]:
        """(level, channels) of each residual block in `run`'s order; level 0 is the full resolution."""
        out, level = [], 0
        for layer in [*self.down, *self.mid, *self.up]:
            if isinstance(layer, ResBlock):
                out.append((level, layer.conv1.out_channels))
            else:
                level += 1 if isinstance(layer, Downsample) else -1
        return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
