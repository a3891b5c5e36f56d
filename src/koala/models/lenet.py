"""LeNet-style CNN: the small client model for MNIST-sized images."""

from __future__ import annotations

from torch import Tensor, nn

from koala.models.registry import InputSpec, register_model


class LeNet(nn.Module):
    """Two conv3x3-ReLU-maxpool stages, then a hidden layer and the classifier; `widths` are the
    two convolutions' channels and the hidden layer's units (16, 32, 64 by default)."""

    def __init__(self, spec: InputSpec, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        pooled = spec.image_size // 4
        first, second, hidden = widths
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, first, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * pooled * pooled, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, spec.num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("lenet", "small", "LeNet-style CNN: 2 conv3x3 + 2 fc layers", memory_format="channels_last")
def lenet(spec: InputSpec) -> nn.Module:
    """LeNet-style CNN for `spec` (105,866 parameters at 1x28x28, 10 classes)."""
    return LeNet(spec)


@register_model("lenet-narrow", "small", "LeNet at half width: conv 8 and 16 channels, fc 32", memory_format="channels_last")
def lenet_narrow(spec: InputSpec) -> nn.Module:
    """The LeNet with half the channels and hidden units: the cheapest rung of the small models."""
    return LeNet(spec, (8, 16, 32))


@register_model("lenet-wide", "small", "LeNet at double width: conv 32 and 64 channels, fc 128", memory_format="channels_last")
def lenet_wide(spec: InputSpec) -> nn.Module:
    """The LeNet with twice the channels and hidden units."""
    return LeNet(spec, (32, 64, 128))
