"""The compute device a run asks for, checked before anything is built on it."""

from __future__ import annotations

import torch

from koala.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """The torch device `name` ("cpu" or "cuda"); asking for a GPU that torch does not see is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch sees no GPU here; set device = 'cpu'")
    return torch.device(name)
