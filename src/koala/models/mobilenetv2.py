"""MobileNetV2 (Sandler et al., 2018), laid out as torchvision's `mobilenet_v2` (width 1.0).

Small images (<= 64 px) get a stride-1 stem; larger ones the ImageNet stride-2 stem.
"""

from __future__ import annotations

from torch import Tensor, nn

from koala.models.layers import conv_bn_act, init_weights, stem_stride
from koala.models.registry import InputSpec, register_model

STEM_CHANNELS = 32
LAST_CHANNELS = 1280

# Table 2 of the paper: expansion t, output channels c, repeats n, first stride s.
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Optional 1x1 expansion, depthwise 3x3, linear 1x1 projection; identity shortcut when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(in_channels, hidden, 1, activation=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            conv_bn_act(hidden, out_channels, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2; `stem_stride=2` with 3 channels and 1000 classes is torchvision's model."""

    def __init__(self, in_channels: int, num_classes: int, stem_stride: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(in_channels, STEM_CHANNELS, 3, stem_stride, activation=nn.ReLU6)]
        width = STEM_CHANNELS
        for expansion, out_channels, repeats, stride in BOTTLENECKS:
            for i in range(repeats):
                layers.append(InvertedResidual(width, out_channels, stride if i == 0 else 1, expansion))
                width = out_channels
        layers.append(conv_bn_act(width, LAST_CHANNELS, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(LAST_CHANNELS, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


@register_model("mobilenetv2", "small", "MobileNetV2 x1.0 (stride-1 stem for images <= 64 px)", memory_format="channels_last")
def mobilenetv2(spec: InputSpec) -> nn.Module:
    """MobileNetV2 for `spec`; the stem keeps full resolution on small images."""
    return MobileNetV2(spec.channels, spec.num_classes, stem_stride=stem_stride(spec.image_size))


@register_model("mobilenetv2-imagenet", "small", "MobileNetV2 x1.0, torchvision's ImageNet layout (stride-2 stem)", memory_format="channels_last")
def mobilenetv2_imagenet(spec: InputSpec) -> nn.Module:
    """MobileNetV2 with the ImageNet stem at any image size."""
    return MobileNetV2(spec.channels, spec.num_classes, stem_stride=2)
