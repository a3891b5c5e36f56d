"""LeNet-style CNN: the small client model for MNIST-sized images."""

from __future__ import annotations

from torch import Tensor, nn

from koala.models.registry import InputSpec, register_model


class LeNet(nn.Module):
    """Two conv3x3-ReLU-maxpool stages, then a 64-unit hidden layer and the classifier."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        pooled = spec.image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * pooled * pooled, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, spec.num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("lenet", "small", "LeNet-style CNN: 2 conv3x3 + 2 fc layers")
def lenet(spec: InputSpec) -> nn.Module:
    """LeNet-style CNN for `spec` (105,866 parameters at 1x28x28, 10 classes)."""
    return LeNet(spec)
