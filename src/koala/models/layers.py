"""Building blocks shared by the architectures."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

SMALL_IMAGE_MAX_SIZE = 64
"""Images up to this size (28x28, 32x32, ...) get the small-image stem or head of an architecture."""


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    activation: type[nn.Module] | None = nn.ReLU,
    norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> normalisation -> optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        norm(out_channels),
    ]
    if activation is not None:
        layers.append(activation(inplace=True))
    return nn.Sequential(*layers)
