"""Small built-in sources that need no files: scikit-learn's 8x8 digits and seeded synthetic images."""

from __future__ import annotations

import math

import numpy as np
import torch

from koala.data.dataset import DataSource, ImageSplit, normalise
from koala.errors import DataError

# Pixel statistics of all 1797 digits after scaling 0..16 to uint8 0..255.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3759,)


def load_digits_source(test_fraction: float = 0.2, seed: int = 0) -> DataSource:
    """scikit-learn's 1797 8x8 digits, split into train/test stratified by label under `seed`."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"digits test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    # Imported here: scikit-learn is slow to import and only this source needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    images = normalise(torch.from_numpy(pixels), DIGITS_MEAN, DIGITS_STD)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    split = ImageSplit(images, labels)
    return DataSource(
        name="digits",
        train=split.subset(torch.from_numpy(np.sort(train_idx))),
        test=split.subset(torch.from_numpy(np.sort(test_idx))),
        num_classes=10,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
    )


def make_synthetic(
    num_train: int = 6000,
    num_test: int = 1000,
    num_classes: int = 10,
    channels: int = 1,
    image_size: int = 28,
    seed: int = 0,
) -> DataSource:
    """Learnable random images: each class is a fixed Gaussian prototype, each image its class's
    prototype plus unit Gaussian noise, scaled to unit variance. Deterministic for `seed`."""
    sizes = {"num_train": num_train, "num_classes": num_classes, "channels": channels, "image_size": image_size}
    bad = {key: value for key, value in sizes.items() if value < 1}
    if bad or num_test < 0:
        raise DataError(
            f"synthetic data needs positive sizes and num_test >= 0, got {sizes | {'num_test': num_test}}"
        )
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, channels, image_size, image_size, generator=generator)

    def draw(count: int) -> ImageSplit:
        labels = torch.randint(num_classes, (count,), generator=generator)
        noise = torch.randn(count, channels, image_size, image_size, generator=generator)
        return ImageSplit((prototypes[labels] + noise) / math.sqrt(2.0), labels)

    return DataSource(name="synthetic", train=draw(num_train), test=draw(num_test), num_classes=num_classes)
