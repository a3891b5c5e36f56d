"""Fashion-MNIST from its four IDX files (gzipped or plain), as a normalised DataSource."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from koala.data.dataset import DataSource, ImageSplit, normalise
from koala.data.idx import find_idx_file, read_idx
from koala.errors import DataError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "KOALA_FASHION_MNIST_DIR"
MEAN = (0.2860,)
STD = (0.3530,)
NUM_CLASSES = 10
IMAGE_SIZE = 28
_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def fashion_mnist_dir(directory: Path | None = None) -> Path:
    """Where Fashion-MNIST lives: `directory`, else $KOALA_FASHION_MNIST_DIR, else DEFAULT_DIR."""
    return Path(directory or os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def load_fashion_mnist(directory: Path | None = None) -> DataSource:
    """Load Fashion-MNIST from `directory`, else $KOALA_FASHION_MNIST_DIR, else DEFAULT_DIR."""
    root = fashion_mnist_dir(directory)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory {root} does not exist. {_install_hint()}")
    train, test = (_load_split(root, images, labels) for images, labels in _SPLITS.values())
    return DataSource(name="fashion-mnist", train=train, test=test, num_classes=NUM_CLASSES, mean=MEAN, std=STD)


def _load_split(root: Path, images_name: str, labels_name: str) -> ImageSplit:
    images_path, labels_path = (_require(root, name) for name in (images_name, labels_name))
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, but Fashion-MNIST "
            f"images are {IMAGE_SIZE}x{IMAGE_SIZE}. {_install_hint()}"
        )
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} images; "
            f"the two files come from different data sets. {_install_hint()}"
        )
    if labels.max(initial=0) >= NUM_CLASSES:
        raise DataError(
            f"{labels_path} has label {labels.max()}, but Fashion-MNIST has {NUM_CLASSES} classes. "
            f"{_install_hint()}"
        )
    pixels = torch.from_numpy(images).unsqueeze(1)
    return ImageSplit(normalise(pixels, MEAN, STD), torch.from_numpy(labels.astype(np.int64)))


def _require(root: Path, name: str) -> Path:
    path = find_idx_file(root, name)
    if path is None:
        raise DataError(
            f"Fashion-MNIST file {root / name}.gz (or uncompressed {name}) is missing. "
            f"{_install_hint()}"
        )
    return path


def _install_hint() -> str:
    return (
        "To install Fashion-MNIST, run `apt-get install -y dataset-fashion-mnist` (Debian; installs to "
        f"{DEFAULT_DIR}) or `koala data download fashion-mnist --dir DIR`, then pass that directory "
        f"or set {ENV_VAR}."
    )
