"""Validation of client updates and FedAvg within each architecture group."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from koala.errors import UpdateRejected
from koala.state import ClientUpdate, StateDict


def validate_update(update: ClientUpdate, expected_architecture: str, reference: Mapping[str, torch.Tensor]) -> None:
    """Raise `UpdateRejected` naming the problem unless `update` fits the architecture it was sent."""
    who = f"client {update.client_id}"
    if update.architecture != expected_architecture:
        raise UpdateRejected(
            f"{who} sent architecture {update.architecture!r} but was assigned {expected_architecture!r}"
        )
    if not isinstance(update.num_examples, int) or isinstance(update.num_examples, bool) or update.num_examples <= 0:
        raise UpdateRejected(f"{who} reported {update.num_examples!r} examples; expected a positive integer")
    missing = sorted(set(reference) - set(update.state))
    extra = sorted(set(update.state) - set(reference))
    if missing or extra:
        raise UpdateRejected(f"{who} sent tensors that do not match {expected_architecture}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, ref in reference.items():
        tensor = update.state[name]
        if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
            raise UpdateRejected(
                f"{who}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UpdateRejected(f"{who}: tensor {name!r} holds NaN or Inf values")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_metrics(client_id: int, metrics: Mapping[str, object]) -> None:
    """Raise `UpdateRejected` unless a reply's metrics are numbers, with `trained-samples` a whole
    number >= 0 and `train-loss` a number (NaN is allowed: a client that trained no batch reports it)."""
    samples, loss = metrics.get("trained-samples"), metrics.get("train-loss")
    if not _is_number(samples) or not math.isfinite(samples) or samples < 0 or samples != int(samples):
        raise UpdateRejected(f"client {client_id} reported trained-samples = {samples!r}; expected a whole number >= 0")
    if not _is_number(loss):
        raise UpdateRejected(f"client {client_id} reported train-loss = {loss!r}; expected a number")
    extra = sorted(k for k, v in metrics.items() if not _is_number(v))
    if extra:
        raise UpdateRejected(f"client {client_id} reported non-numeric metrics {extra}")


def update_distance(update: ClientUpdate, reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the update's change to `reference`, over every floating-point tensor (weights and
    BatchNorm statistics; integer counters are left out), summed in float64."""
    squares = [  # by name: the sum does not depend on the order a state dict lists its tensors in
        (update.state[name].to(torch.float64) - ref.to(update.state[name].device, torch.float64)).square().sum()
        for name, ref in sorted(reference.items()) if ref.is_floating_point()
    ]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def clip_update(update: ClientUpdate, reference: Mapping[str, torch.Tensor], max_norm: float) -> ClientUpdate:
    """The update with its change to `reference` scaled down to L2 norm `max_norm` (the direction is
    kept); integer tensors are left as sent. Call it on validated updates whose norm exceeds `max_norm`."""
    scale = max_norm / update_distance(update, reference)
    state = {}
    for name, ref in reference.items():
        sent = update.state[name]
        if ref.is_floating_point():
            ref = ref.to(sent.device)  # the update stays where it arrived (a Flower reply is on the CPU)
            sent = (ref + (sent - ref) * scale).to(ref.dtype)
        state[name] = sent
    return ClientUpdate(update.client_id, update.architecture, state, update.num_examples, update.metrics)


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Weighted average of state dicts (weights are normalised). Sums run in float64; integer buffers
    such as BatchNorm's batch counter are rounded back to their dtype."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    result: StateDict = {}
    for name, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for state, weight in zip(states, weights):
            acc.add_(state[name].to(torch.float64), alpha=weight / total)
        result[name] = acc.round().to(first.dtype) if not first.is_floating_point() else acc.to(first.dtype)
    return result


@dataclass(frozen=True)
class GroupAggregate:
    """The FedAvg of one architecture's updates in a round."""

    state: StateDict
    num_examples: int
    num_clients: int


def aggregate_by_architecture(updates: Sequence[ClientUpdate]) -> dict[str, GroupAggregate]:
    """Group updates by architecture and FedAvg each group, weighted by sample count."""
    groups: dict[str, list[ClientUpdate]] = defaultdict(list)
    for update in updates:
        groups[update.architecture].append(update)
    return {
        arch: GroupAggregate(
            state=fedavg([u.state for u in group], [u.num_examples for u in group]),
            num_examples=sum(u.num_examples for u in group),
            num_clients=len(group),
        )
        for arch, group in sorted(groups.items())
    }
