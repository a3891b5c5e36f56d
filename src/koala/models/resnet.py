"""ResNet-18/34 (He et al., 2016) with BasicBlocks and a choice of stem.

Stems: "cifar" (conv3x3 stride 1, no max-pool: the standard for 28/32 px images),
"downsample" (conv3x3 stride 2 + max-pool: about 14x cheaper on 28 px) and "imagenet"
(conv7x7 stride 2 + max-pool, as torchvision).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from koala.models.layers import conv_bn_act, init_weights
from koala.models.registry import InputSpec, register_model

Stem = Literal["cifar", "downsample", "imagenet"]

# kernel, stride, max-pool after it
STEMS: dict[str, tuple[int, int, bool]] = {
    "cifar": (3, 1, False),
    "downsample": (3, 2, True),
    "imagenet": (7, 2, True),
}
LAYERS_18 = (2, 2, 2, 2)
LAYERS_34 = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv -> BatchNorm, no activation (the residual sum comes first)."""
    return conv_bn_act(in_channels, out_channels, kernel, stride, activation=None)


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2 = conv_bn(out_channels, out_channels, 3)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            conv_bn(in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + self.shortcut(x))


def make_stem(stem: Stem, in_channels: int, width: int) -> nn.Sequential:
    """The input stem: conv-BN-ReLU, then a 3x3 stride-2 max-pool unless `stem` is "cifar"."""
    if stem not in STEMS:
        raise ValueError(f"unknown ResNet stem {stem!r}; choose from {sorted(STEMS)}")
    kernel, stride, pool = STEMS[stem]
    layers: list[nn.Module] = [*conv_bn(in_channels, width, kernel, stride), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet of BasicBlocks; `stem="imagenet"`, 3 channels, 1000 classes is torchvision's model."""

    def __init__(self, layers: Sequence[int], in_channels: int, num_classes: int, stem: Stem = "cifar") -> None:
        super().__init__()
        self.stem = make_stem(stem, in_channels, WIDTHS[0])
        stages: list[nn.Module] = []
        width = WIDTHS[0]
        for index, (blocks, out) in enumerate(zip(layers, WIDTHS)):
            stride = 1 if index == 0 else 2
            rest = (BasicBlock(out, out) for _ in range(blocks - 1))
            stages.append(nn.Sequential(BasicBlock(width, out, stride), *rest))
            width = out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self, linear_std=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def _register(name: str, layers: Sequence[int], stem: Stem, description: str) -> None:
    @register_model(name, "large", description)
    def build(spec: InputSpec) -> nn.Module:
        return ResNet(layers, spec.channels, spec.num_classes, stem=stem)


_register("resnet18", LAYERS_18, "cifar", "ResNet-18, CIFAR stem (conv3x3 stride 1, no max-pool)")
_register("resnet34", LAYERS_34, "cifar", "ResNet-34, CIFAR stem (conv3x3 stride 1, no max-pool)")
_register("resnet18-ds", LAYERS_18, "downsample", "ResNet-18, downsampling stem (conv3x3 stride 2 + max-pool)")
_register("resnet34-ds", LAYERS_34, "downsample", "ResNet-34, downsampling stem (conv3x3 stride 2 + max-pool)")
_register("resnet18-imagenet", LAYERS_18, "imagenet", "ResNet-18, torchvision's ImageNet layout (conv7x7 stride 2 + max-pool)")
