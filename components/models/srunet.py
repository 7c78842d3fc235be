"""A super-resolution U-Net (SR3-style): ``(x [B,C,H,W], t [B], y [B], lowres [B,C,H/f,W/f]) -> eps [B,C,H,W]``.

Saharia et al. 2021 (SR3): the denoiser sees the low-resolution image, upsampled to the output
size, as extra input channels beside the noisy image, so the reverse process draws a
high-resolution image consistent with it. The upsampling (nearest or bilinear, ConditionConfig
``upsample``) is inside the network, so the exported graph takes the low-res image at its own
size and no second copy of the resampling lives outside it. Everything else is the class-
conditional U-Net of components/models/unet.py (imported, not copied); genflow's SR model feeds
the null class (no label conditioning).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import ConditionConfig, UNetConfig  # noqa: F401  (re-exported: the network's shape)
from components.models.unet import UNet, UNetConfigError


class SuperResUNet(UNet):
    """UNet whose first convolution reads [noisy image, upsampled low-res image] (2C channels).

    SuperResUNet(UNetConfig(channels=[32, 64]), image_size=8, in_channels=1, num_classes=10,
                 condition=ConditionConfig(factor=2, upsample="bilinear"))
    """

    def __init__(self, config: UNetConfig, image_size: int, in_channels: int = 1, num_classes: int = 10,
                 condition: ConditionConfig | None = None):
        condition = condition or ConditionConfig()
        if condition.factor < 2 or image_size % condition.factor != 0:
            raise UNetConfigError(f"condition.factor: {condition.factor} must be at least 2 and divide image_size "
                                  f"{image_size}; use an image_size divisible by it")
        super().__init__(config, image_size, in_channels, num_classes)
        self.condition = condition
        self.lowres_size = image_size // condition.factor
        self.conv_in = nn.Conv2d(2 * in_channels, config.channels[0], 3, padding=1)  # noisy + upsampled low-res

    def upsample(self, lowres: torch.Tensor) -> torch.Tensor:
        """(B, C, H/f, W/f) -> (B, C, H, W): the conditioning channels."""
        if self.condition.upsample == "nearest":
            return F.interpolate(lowres, scale_factor=float(self.condition.factor), mode="nearest")
        return F.interpolate(lowres, scale_factor=float(self.condition.factor), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, lowres: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat([x, self.upsample(lowres)], dim=1), t, y)   # (B, C, H, W)
