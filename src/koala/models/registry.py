"""Model registry: a name maps to a constructor that builds the network for a data set's shape.

Input channels, image size and class count come from the data (`InputSpec`), never from the name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from koala.errors import ModelError

Role = Literal["small", "large"]
MemoryFormat = Literal["contiguous", "channels_last"]


@dataclass(frozen=True)
class InputSpec:
    """The shape of the inputs a model sees and the number of classes it predicts."""

    channels: int
    image_size: int
    num_classes: int


@dataclass(frozen=True)
class ModelEntry:
    name: str
    role: Role
    description: str
    build: Callable[[InputSpec], nn.Module]
    memory_format: MemoryFormat = "contiguous"
    """The layout its weights train and infer in: channels_last where it was measured to be faster
    on the CPU (benchmarks/memory_format.py); the results equal the contiguous ones within float
    tolerance, and state dicts always leave a model contiguous."""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, role: Role, description: str, memory_format: MemoryFormat = "contiguous"):
    """Decorator: register `fn(spec) -> nn.Module` under `name`, trained in `memory_format`."""

    def decorator(fn: Callable[[InputSpec], nn.Module]) -> Callable[[InputSpec], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, role, description, fn, memory_format)
        return fn

    return decorator


def model_names(role: Role | None = None) -> list[str]:
    """Registered model names, sorted; only those of `role` when given."""
    return sorted(n for n, e in _REGISTRY.items() if role is None or e.role == role)


def model_entry(name: str) -> ModelEntry:
    """The registry entry for `name`; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(model_names())}."
        ) from None


def build_model(name: str, spec: InputSpec) -> nn.Module:
    """Build the registered model `name` for inputs of shape `spec`."""
    return model_entry(name).build(spec)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
