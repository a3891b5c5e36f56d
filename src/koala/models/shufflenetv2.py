"""ShuffleNetV2 (Ma et al., 2018), laid out as torchvision's `shufflenet_v2_x1_0` / `_x0_5`.

Small images (<= 64 px) get a 3x3 stride-1 stem without the max-pool; larger ones the ImageNet
stem (3x3 stride 2 + max-pool). The "-ds" variant's downsampling stem (3x3 stride 2, no max-pool)
halves small images once, for about a quarter of the small-image stem's FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from koala.models.layers import SMALL_IMAGE_MAX_SIZE, conv_bn_act
from koala.models.registry import InputSpec, register_model

STAGE_REPEATS = (4, 8, 4)
CHANNELS_X1_0 = (24, 116, 232, 464, 1024)
CHANNELS_X0_5 = (24, 48, 96, 192, 1024)
CHANNELS_X1_5 = (24, 176, 352, 704, 1024)
CHANNELS_X2_0 = (24, 244, 488, 976, 2048)

Stem = Literal["small", "downsampling", "imagenet"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of `groups` equal groups."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit: split (stride 1) or duplicate (stride 2) the input into two branches,
    concatenate and shuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        branch = out_channels // 2
        if stride == 1 and in_channels != 2 * branch:
            raise ValueError("a stride-1 unit needs in_channels == out_channels (even)")
        self.stride = stride
        self.branch1 = (
            nn.Sequential(
                conv_bn_act(in_channels, in_channels, 3, stride, groups=in_channels, activation=None),
                conv_bn_act(in_channels, branch, 1),
            )
            if stride > 1
            else None
        )
        self.branch2 = nn.Sequential(
            conv_bn_act(in_channels if stride > 1 else branch, branch, 1),
            conv_bn_act(branch, branch, 3, stride, groups=branch, activation=None),
            conv_bn_act(branch, branch, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.branch1 is None:
            kept, processed = x.chunk(2, dim=1)
            out = torch.cat((kept, self.branch2(processed)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2; `stem="imagenet"` with 3 channels and 1000 classes is torchvision's model."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = CHANNELS_X1_0,
        repeats: Sequence[int] = STAGE_REPEATS,
        stem: Stem = "imagenet",
    ) -> None:
        super().__init__()
        if len(channels) != len(repeats) + 2:
            raise ValueError("channels needs the stem, one entry per stage and conv5")
        self.conv1 = conv_bn_act(in_channels, channels[0], 3, stride=1 if stem == "small" else 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        stages: list[nn.Module] = []
        width = channels[0]
        for count, out in zip(repeats, channels[1:-1]):
            rest = (InvertedResidual(out, out, 1) for _ in range(count - 1))
            stages.append(nn.Sequential(InvertedResidual(width, out, 2), *rest))
            width = out
        self.stages = nn.Sequential(*stages)
        self.conv5 = conv_bn_act(width, channels[-1], 1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _for_spec(spec: InputSpec, channels: Sequence[int]) -> ShuffleNetV2:
    stem: Stem = "small" if spec.image_size <= SMALL_IMAGE_MAX_SIZE else "imagenet"
    return ShuffleNetV2(spec.channels, spec.num_classes, channels, stem=stem)


@register_model("shufflenetv2", "small", "ShuffleNetV2 x1.0 (small-image stem for images <= 64 px)", memory_format="channels_last")
def shufflenetv2_x1_0(spec: InputSpec) -> nn.Module:
    """ShuffleNetV2 x1.0 for `spec`."""
    return _for_spec(spec, CHANNELS_X1_0)


@register_model("shufflenetv2-0.5", "small", "ShuffleNetV2 x0.5 (small-image stem for images <= 64 px)", memory_format="channels_last")
def shufflenetv2_x0_5(spec: InputSpec) -> nn.Module:
    """ShuffleNetV2 x0.5 for `spec`."""
    return _for_spec(spec, CHANNELS_X0_5)


@register_model("shufflenetv2-0.5-ds", "small", "ShuffleNetV2 x0.5 with a downsampling stem (3x3 stride 2, no max-pool)", memory_format="channels_last")
def shufflenetv2_x0_5_ds(spec: InputSpec) -> nn.Module:
    """ShuffleNetV2 x0.5 whose stem halves the image once (28x28 -> 14x14)."""
    return ShuffleNetV2(spec.channels, spec.num_classes, CHANNELS_X0_5, stem="downsampling")


@register_model("shufflenetv2-imagenet", "small", "ShuffleNetV2 x1.0, torchvision's ImageNet layout (stride-2 stem + max-pool)", memory_format="channels_last")
def shufflenetv2_imagenet(spec: InputSpec) -> nn.Module:
    """ShuffleNetV2 x1.0 with the ImageNet stem at any image size."""
    return ShuffleNetV2(spec.channels, spec.num_classes, CHANNELS_X1_0, stem="imagenet")


@register_model("shufflenetv2-1.5-imagenet", "small", "ShuffleNetV2 x1.5, torchvision's ImageNet layout (stride-2 stem + max-pool)",
                memory_format="channels_last")
def shufflenetv2_x1_5_imagenet(spec: InputSpec) -> nn.Module:
    """ShuffleNetV2 x1.5 with the ImageNet stem (3,503,624 parameters at 3x224x224, 1,000 classes)."""
    return ShuffleNetV2(spec.channels, spec.num_classes, CHANNELS_X1_5, stem="imagenet")


@register_model("shufflenetv2-2.0-imagenet", "small", "ShuffleNetV2 x2.0, torchvision's ImageNet layout (stride-2 stem + max-pool)",
                memory_format="channels_last")
def shufflenetv2_x2_0_imagenet(spec: InputSpec) -> nn.Module:
    """ShuffleNetV2 x2.0 with the ImageNet stem (7,393,996 parameters at 3x224x224, 1,000 classes)."""
    return ShuffleNetV2(spec.channels, spec.num_classes, CHANNELS_X2_0, stem="imagenet")
