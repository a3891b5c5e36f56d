"""Building blocks shared by the architectures."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

SMALL_IMAGE_MAX_SIZE = 64
"""Images up to this size (28x28, 32x32, ...) get the small-image stem or head of an architecture."""


def stem_stride(image_size: int) -> int:
    """A stem's stride: 1 keeps full resolution on small images, 2 (the ImageNet stem) halves larger ones."""
    return 1 if image_size <= SMALL_IMAGE_MAX_SIZE else 2


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


def init_weights(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """torchvision's initialisation: He-normal (fan-out) convolutions, unit BatchNorm, zero biases,
    and N(0, linear_std) linear layers (PyTorch's default linear init when `linear_std` is None)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
