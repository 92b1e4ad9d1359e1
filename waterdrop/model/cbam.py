"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018).

Channel attention (a shared MLP over average- and max-pooled descriptors) followed by
spatial attention (a 7x7 convolution over channel-wise mean and max maps). It helps when
the offending part of an image is a small region.
"""

from __future__ import annotations

import torch
from torch import nn


class CBAM(nn.Module):
    """Channel then spatial attention; output has the input's shape.

    It starts as the identity: the output is ``x + blend * (attended - x)`` with ``blend`` a
    learned scalar initialised to 0. Plain CBAM would scale every feature by about 1/4 at
    initialisation (two sigmoids near 0.5), which wrecks a pretrained trunk's features; this
    way adding CBAM to a pretrained trunk changes nothing at the first step, and attention
    is blended in as ``blend`` learns.

    Args:
        channels: input channels.
        reduction: bottleneck ratio of the channel MLP (the paper uses 16).
        kernel_size: kernel of the spatial attention convolution (the paper uses 7).
        device, dtype: passed on to the parameters (timm's block builders set them).
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, device=None, dtype=None):
        super().__init__()
        hidden = max(channels // reduction, 8)
        dd = {"device": device, "dtype": dtype}
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False, **dd),
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.blend = nn.Parameter(torch.zeros(1, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.channel_mlp(x.mean(dim=(2, 3), keepdim=True))
        peak = self.channel_mlp(x.amax(dim=(2, 3), keepdim=True))
        attended = x * torch.sigmoid(avg + peak)
        maps = torch.cat([attended.mean(dim=1, keepdim=True), attended.amax(dim=1, keepdim=True)], dim=1)
        attended = attended * torch.sigmoid(self.spatial(maps))
        return x + self.blend * (attended - x)
