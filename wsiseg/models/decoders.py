"""Segmentation decoders: feature maps (and the image) in, logits at the input size out.

Both take `features`, a list of (B, C_i, h_i, w_i) maps ordered shallow to deep, and the
normalised image (B, 3, H, W), and return (B, num_classes, H, W) for any H, W (non-square
included). Upsampling steps go by x2 and the last one lands exactly on (H, W), so patch 8, 14
and 16 (and CNN strides) are all exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsiseg.models.choices import DECODERS


class ConvBlock(nn.Sequential):
    """3x3 convolution, batch norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def upsampling_steps(stride: int) -> int:
    """How many x2 steps take a map at `stride` back to the input size (the last may be smaller)."""
    return max(1, math.ceil(math.log2(stride))) if stride > 1 else 1


def step_sizes(start: tuple[int, int], final: tuple[int, int], steps: int) -> list[tuple[int, int]]:
    """Sizes after each x2 step from `start`, capped at `final`, the last one exactly `final`."""
    sizes = [(min(final[0], start[0] * 2 ** i), min(final[1], start[1] * 2 ** i)) for i in range(1, steps + 1)]
    sizes[-1] = final
    return sizes


class ProgressiveDecoder(nn.Module):
    """The reference decoder: last-layer grid, 3x3 conv to 512, x2 blocks 256/128/64/16, 3x3 head.

    Unlike the reference it keeps the grid's own height and width (non-square inputs work) and
    sizes the last upsampling so the output is exactly the input size for any patch size.
    """

    def __init__(self, in_dims: Sequence[int], strides: Sequence[int], num_classes: int) -> None:
        super().__init__()
        steps = upsampling_steps(strides[-1])
        widths = [256 >> i for i in range(steps - 1)] + [16]
        self.steps = steps
        self.stem = ConvBlock(in_dims[-1], 512)
        channels = [512, *widths]
        self.blocks = nn.ModuleList(
            nn.Sequential(ConvBlock(channels[i], channels[i + 1]), ConvBlock(channels[i + 1], channels[i + 1]))
            for i in range(steps)
        )
        self.head = nn.Conv2d(widths[-1], num_classes, 3, padding=1)

    def forward(self, features: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        x = self.stem(features[-1])
        for size, block in zip(step_sizes(tuple(x.shape[-2:]), tuple(image.shape[-2:]), self.steps), self.blocks):
            x = block(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return self.head(x)


class FusedDecoder(nn.Module):
    """Intermediate layers fused deep to shallow, then x2 steps that each also see the RGB image.

    Every feature map is projected (1x1) to a width that shrinks with its stride (`width` at
    stride 16 and coarser, at least 32), and maps are merged from the deepest to the shallowest
    by concatenation and a 3x3 block (resized when strides differ, as for CNN stages). The
    fused map is then upsampled by x2 steps to the input size; at each step a small convolution
    of the image resized to that scale is concatenated, which recovers the detail lost to the
    backbone's 1/8 to 1/32 resolution.
    """

    def __init__(self, in_dims: Sequence[int], strides: Sequence[int], num_classes: int,
                 width: int = 256, rgb_width: int = 16) -> None:
        super().__init__()
        level_widths = [min(width, max(32, width * s // 16)) for s in strides]
        self.project = nn.ModuleList(ConvBlock(d, w, kernel=1) for d, w in zip(in_dims, level_widths))
        deep_first = list(reversed(level_widths))
        self.merge = nn.ModuleList(ConvBlock(a + b, b) for a, b in zip(deep_first, deep_first[1:]))
        self.steps = upsampling_steps(min(strides))
        channels = [level_widths[0]]
        for _ in range(self.steps):
            channels.append(max(32, channels[-1] // 2))
        self.rgb = nn.ModuleList(ConvBlock(3, rgb_width) for _ in range(self.steps))
        self.blocks = nn.ModuleList(
            nn.Sequential(ConvBlock(channels[i] + rgb_width, channels[i + 1]), ConvBlock(channels[i + 1], channels[i + 1]))
            for i in range(self.steps)
        )
        self.head = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, features: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        deep_first = list(reversed(features))
        projections = list(reversed(self.project))
        x = projections[0](deep_first[0])
        for feature, project, merge in zip(deep_first[1:], projections[1:], self.merge):
            if feature.shape[-2:] != x.shape[-2:]:
                x = F.interpolate(x, size=feature.shape[-2:], mode="bilinear", align_corners=False)
            x = merge(torch.cat([x, project(feature)], dim=1))
        for size, rgb, block in zip(step_sizes(tuple(x.shape[-2:]), tuple(image.shape[-2:]), self.steps),
                                    self.rgb, self.blocks):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            scaled = image if size == tuple(image.shape[-2:]) else F.interpolate(image, size=size, mode="area")
            x = block(torch.cat([x, rgb(scaled)], dim=1))
        return self.head(x)


def build_decoder(kind: str, in_dims: Sequence[int], strides: Sequence[int], num_classes: int) -> nn.Module:
    """The decoder registered as `kind` in `wsiseg.models.choices.DECODERS`."""
    return DECODERS.load(kind)(in_dims, strides, num_classes)
