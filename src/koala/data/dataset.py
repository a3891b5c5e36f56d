"""In-memory image data sets: the one shape every source produces and every engine consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSplit:
    """Images as a normalised float32 tensor (N, C, H, W) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be ({self.images.shape[0]},), got shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ImageSplit:
        """The examples at `indices`, as a new split (tensor indexing, no Python loop)."""
        return ImageSplit(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class DataSource:
    """A data set's training and test splits, with the facts models are built from."""

    name: str
    train: ImageSplit
    test: ImageSplit
    num_classes: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    """The per-channel standardisation the images went through after scaling pixels to [0, 1]
    (empty: the images are not pixels, as the synthetic source's): what a device must do to its
    camera's pixels before the model sees them."""

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[2])


def normalise(images_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1], then standardised per channel."""
    images = images_uint8.to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return images.sub_(mean_t).div_(std_t)
