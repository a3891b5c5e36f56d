"""One config seed derives every random stream (partition, sampling, init, loaders).

Streams are named, so adding a new stream never shifts the numbers another stream draws. Work that
draws from torch's global generator (dropout layers) runs under `seeded_torch`, so no random state
carries over from one round to the next; `GlobalRngState` still captures every global generator for
checkpoints, so that code drawing from them outside koala-fl's streams resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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
def seeded_torch(root: int, *names: str | int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block (model construction, training with dropout) under the named stream, restoring
    torch's global generators afterwards: the CPU one, and `device`'s when it is a GPU."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(root, *names))
        yield


@dataclass(frozen=True)
class GlobalRngState:
    """The state of every global random generator: torch's (CPU and each GPU), numpy's and Python's."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]
    numpy: tuple[Any, ...]
    python: tuple[Any, ...]

    @classmethod
    def capture(cls) -> GlobalRngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return cls(torch.get_rng_state(), list(cuda), np.random.get_state(), random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)
