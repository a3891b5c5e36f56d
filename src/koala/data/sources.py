"""One entry point for every data source: `load_source(name, directory, **options)`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koala.data.cifar import load_cifar10, load_cifar100
from koala.data.dataset import DataSource
from koala.data.fashion_mnist import load_fashion_mnist
from koala.data.small_sources import load_digits_source, make_synthetic
from koala.errors import DataError

# Sources read from a directory; the others are built in and take only options.
_FILE_SOURCES: dict[str, Callable[..., DataSource]] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}
_BUILT_IN_SOURCES: dict[str, Callable[..., DataSource]] = {
    "digits": load_digits_source,
    "synthetic": make_synthetic,
}
SOURCE_NAMES: tuple[str, ...] = (*_FILE_SOURCES, *_BUILT_IN_SOURCES)


def load_source(name: str, directory: Path | str | None = None, **options: Any) -> DataSource:
    """Load data set `name`. File sources read `directory` (None or "" = their env var or default);
    digits and synthetic take keyword options (e.g. seed, num_train) and no directory."""
    if name in _FILE_SOURCES:
        loader = _FILE_SOURCES[name]
        arguments = {"directory": Path(directory) if directory else None, **options}
    elif name in _BUILT_IN_SOURCES:
        loader = _BUILT_IN_SOURCES[name]
        arguments = {"directory": directory, **options} if directory else options
    else:
        raise DataError(f"unknown data set {name!r}; known data sets: {', '.join(SOURCE_NAMES)}")
    try:
        inspect.signature(loader).bind(**arguments)
    except TypeError as exc:
        raise DataError(f"cannot load data set {name!r} with arguments {sorted(arguments)}: {exc}") from None
    return loader(**arguments)
