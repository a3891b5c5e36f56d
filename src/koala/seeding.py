"""One config seed derives every random stream (partition, sampling, init, loaders).

Streams are named, so adding a new stream never shifts the numbers another stream draws.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(root: int, *names: str | int) -> int:
    """A 63-bit seed for the stream named by `names`, derived from the experiment's root seed."""
    text = "/".join([str(root), *map(str, names)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def torch_generator(root: int, *names: str | int) -> torch.Generator:
    """A CPU torch generator for the named stream."""
    return torch.Generator().manual_seed(derive_seed(root, *names))


def numpy_generator(root: int, *names: str | int) -> np.random.Generator:
    """A numpy generator for the named stream."""
    return np.random.default_rng(derive_seed(root, *names))


@contextmanager
def seeded_torch(root: int, *names: str | int) -> Iterator[None]:
    """Run a block (e.g. model construction) under the named stream without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(root, *names))
        yield
