"""VGG with batch norm (Simonyan & Zisserman, 2015), features as torchvision's `make_layers`.

Images <= 64 px get the common CIFAR head (global average pool + one linear layer), and a
max-pool is skipped once the feature map is 1x1; larger images get the ImageNet head.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from koala.models.layers import SMALL_IMAGE_MAX_SIZE, init_weights
from koala.models.registry import InputSpec, register_model

POOL = "M"

# Configurations A (VGG-11), D (VGG-16) and E (VGG-19) of the paper: conv widths and max-pools.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "D": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    "E": (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
        512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
    ),
}  # fmt: skip

Head = Literal["small", "imagenet"]


def make_features(
    config: tuple[int | str, ...], in_channels: int, image_size: int, batch_norm: bool = True
) -> nn.Sequential:
    """Conv3x3 (-BN) -ReLU stacks and 2x2 max-pools; a pool is skipped when the map is already 1x1."""
    layers: list[nn.Module] = []
    size = image_size
    for item in config:
        if isinstance(item, int):
            layers.append(nn.Conv2d(in_channels, item, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=True))
            in_channels = item
        elif size > 1:
            layers.append(nn.MaxPool2d(2, 2))
            size //= 2
    return nn.Sequential(*layers)


def make_head(head: Head, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """`small`: global pool + Linear(512, classes); `imagenet`: 7x7 pool + the three fc layers."""
    if head == "small":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )


class VGG(nn.Module):
    """VGG of `config`; `head="imagenet"` at 224 px, 3 channels, 1000 classes is torchvision's model."""

    def __init__(self, config: str, spec: InputSpec, batch_norm: bool = True, head: Head = "small") -> None:
        super().__init__()
        self.features = make_features(CONFIGS[config], spec.channels, spec.image_size, batch_norm)
        self.classifier = make_head(head, spec.num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _for_spec(config: str, spec: InputSpec) -> VGG:
    head: Head = "small" if spec.image_size <= SMALL_IMAGE_MAX_SIZE else "imagenet"
    return VGG(config, spec, batch_norm=True, head=head)


@register_model("vgg11", "large", "VGG-11 with batch norm (CIFAR head for images <= 64 px)")
def vgg11(spec: InputSpec) -> nn.Module:
    """VGG-11-BN (configuration A) for `spec`."""
    return _for_spec("A", spec)


@register_model("vgg16", "large", "VGG-16 with batch norm (CIFAR head for images <= 64 px)")
def vgg16(spec: InputSpec) -> nn.Module:
    """VGG-16-BN (configuration D) for `spec`."""
    return _for_spec("D", spec)


@register_model("vgg19", "large", "VGG-19 with batch norm (CIFAR head for images <= 64 px)")
def vgg19(spec: InputSpec) -> nn.Module:
    """VGG-19-BN (configuration E) for `spec`."""
    return _for_spec("E", spec)


@register_model("vgg19-imagenet", "large", "VGG-19 without batch norm, torchvision's ImageNet layout (three fc layers)")
def vgg19_imagenet(spec: InputSpec) -> nn.Module:
    """torchvision's `vgg19` (configuration E, no batch norm, 7x7 pool and the 4096-wide head)."""
    return VGG("E", spec, batch_norm=False, head="imagenet")
