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
    """Run a block (model construction, training with dropout) under the named stream: torch's CPU
    generator, and `device`'s when it is a GPU, are seeded for the block and restored after it;
    no other generator is touched."""
    seed = derive_seed(root, *names)
    gpu = None
    if device is not None and device.type == "cuda":
        gpu = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[] if gpu is None else [gpu]):
        torch.random.default_generator.manual_seed(seed)
        if gpu is not None:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
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
        """The generators' states now; GPU generators only where this process has started CUDA."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), list(cuda), np.random.get_state(), random.getstate())

    def restore(self) -> None:
        """Set every generator back to this state (GPU ones for the GPUs this machine has)."""
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            for index, state in enumerate(self.torch_cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)
        np.random.set_state(self.numpy)
        random.setstate(self.python)
