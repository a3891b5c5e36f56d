"""The state that moves between the server and its clients, as plain types: a model's weights, the
task a client receives, the update it sends back and what the server holds between rounds.

Every layer names these types; this module imports nothing of koala, so naming them pulls in no
algorithm, engine or run code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]
"""A model's weights and buffers by name."""


@dataclass(frozen=True)
class ClientTask:
    """What the server sends one client: the architecture to train and its current weights."""

    client_id: int
    architecture: str
    state: StateDict


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back: its architecture, trained weights and sample count."""

    client_id: int
    architecture: str
    state: StateDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerState:
    """Everything the server holds between rounds: the large model and one small model per architecture."""

    round: int
    large: StateDict | None
    small: dict[str, StateDict]
    optimizers: dict[str, StateDict] = field(default_factory=dict)
    """SGD momentum buffers (by parameter name) that the server carries across rounds, by training
    role ("reverse", "forward:ARCH"); empty unless `distill.keep-optimizer-state`."""
