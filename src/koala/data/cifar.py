"""CIFAR-10 and CIFAR-100 from the official python-pickle batches, read with a restricted unpickler.

A pickle can run arbitrary code when loaded, so only the numpy globals needed to rebuild arrays
are resolved; any other global refuses the file before anything is called.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from koala.data.dataset import DataSource, ImageSplit, normalise
from koala.errors import DataError

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

CIFAR10_DIR = Path("~/.cache/koala/cifar10")
CIFAR100_DIR = Path("~/.cache/koala/cifar100")
CIFAR10_ENV_VAR = "KOALA_CIFAR10_DIR"
CIFAR100_ENV_VAR = "KOALA_CIFAR100_DIR"
_IMAGE_SHAPE = (3, 32, 32)


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles written by Python 3 use for bytes."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected encoding {encoding!r} for a bytes object")
    return text.encode("latin1")


# The globals numpy array pickles refer to, under numpy 1 and numpy 2 module names.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{
        (f"numpy.{core}.{module}", name): getattr(source, name)
        for core in ("core", "_core")
        for module, name, source in (
            ("multiarray", "_reconstruct", _multiarray),
            ("multiarray", "scalar", _multiarray),
            ("numeric", "_frombuffer", _numeric),
        )
    },
}


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps its batches and how to read them."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    env_var: str
    default_dir: Path


_CIFAR10 = _Layout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    label_key=b"labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    env_var=CIFAR10_ENV_VAR,
    default_dir=CIFAR10_DIR,
)
_CIFAR100 = _Layout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    label_key=b"fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    env_var=CIFAR100_ENV_VAR,
    default_dir=CIFAR100_DIR,
)


_LAYOUTS = {layout.name: layout for layout in (_CIFAR10, _CIFAR100)}


def cifar_dir(name: str, directory: Path | None = None) -> Path:
    """Where CIFAR `name` ("cifar10" or "cifar100") lives: `directory`, else its env var
    (KOALA_CIFAR10_DIR / KOALA_CIFAR100_DIR), else its default directory."""
    layout = _LAYOUTS[name]
    return Path(directory or os.environ.get(layout.env_var) or layout.default_dir).expanduser()


def load_cifar10(directory: Path | None = None) -> DataSource:
    """Load CIFAR-10 from `directory` (the parent of cifar-10-batches-py, or that folder itself),
    else $KOALA_CIFAR10_DIR, else CIFAR10_DIR."""
    return _load(_CIFAR10, directory)


def load_cifar100(directory: Path | None = None) -> DataSource:
    """Load CIFAR-100 (fine labels) from `directory` (the parent of cifar-100-python, or that folder
    itself), else $KOALA_CIFAR100_DIR, else CIFAR100_DIR."""
    return _load(_CIFAR100, directory)


def _load(layout: _Layout, directory: Path | None) -> DataSource:
    root = cifar_dir(layout.name, directory)
    batches = root / layout.folder if (root / layout.folder).is_dir() else root
    missing = [batches / f for f in (*layout.train_files, layout.test_file) if not (batches / f).is_file()]
    if missing:
        raise DataError(
            f"{layout.name} not found: {missing[0]} is missing (looked in {root} and {root / layout.folder}). "
            f"Run `koala data download {layout.name} --dir DIR`, then pass that directory or set "
            f"{layout.env_var}."
        )
    train_parts = [_read_batch(batches / f, layout) for f in layout.train_files]
    train = ImageSplit(
        torch.cat([split.images for split in train_parts]), torch.cat([split.labels for split in train_parts])
    )
    test = _read_batch(batches / layout.test_file, layout)
    return DataSource(name=layout.name, train=train, test=test, num_classes=layout.num_classes, mean=layout.mean,
                      std=layout.std)


def _read_batch(path: Path, layout: _Layout) -> ImageSplit:
    """One pickled batch -> a normalised split, after checking its keys, shapes and labels."""
    batch = _unpickle(path, layout)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(layout.label_key) if isinstance(batch, dict) else None
    pixels = int(np.prod(_IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise _corrupt(path, layout, f"expected b'data' to be a uint8 array of shape (N, {pixels})")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        label_array = None
    if label_array is None or label_array.shape != (len(data),):
        raise _corrupt(path, layout, f"expected {layout.label_key!r} to hold {len(data)} integer labels")
    if len(label_array) and (label_array.min() < 0 or label_array.max() >= layout.num_classes):
        raise _corrupt(path, layout, f"labels must lie in 0..{layout.num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(data)).view(len(data), *_IMAGE_SHAPE)
    return ImageSplit(normalise(images, layout.mean, layout.std), torch.from_numpy(label_array))


def _unpickle(path: Path, layout: _Layout) -> Any:
    try:
        with path.open("rb") as stream:
            return _ArrayUnpickler(stream, path, encoding="bytes").load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean the same to the user
        raise _corrupt(path, layout, f"{type(exc).__name__}: {exc}") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the numpy globals in _ALLOWED_GLOBALS; anything else refuses the file."""

    def __init__(self, stream: Any, path: Path, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path} refers to {module}.{name}, which a CIFAR batch never contains; refusing "
                "to unpickle it, because a pickle can run arbitrary code. Delete the file and download "
                "the data set again from the official site."
            ) from None


def _corrupt(path: Path, layout: _Layout, detail: str) -> DataError:
    return DataError(
        f"{path} is not a valid {layout.name} batch ({detail}). Delete it and run "
        f"`koala data download {layout.name} --dir DIR`."
    )
