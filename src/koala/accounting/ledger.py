"""The run's ledger: the bytes, client FLOPs and server FLOPs of every round (from the measured
per-sample costs of `koala.accounting.measure`), their totals, and the reductions against
FedAvg-large that resources.json and summary.json report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from koala.accounting.measure import TRAIN_MEMORY_METHOD, CostTable


@dataclass(frozen=True)
class ClientExchange:
    """One client's round as the server saw it: what was sent, what came back, and its training."""

    client_id: int
    architecture: str
    bytes_down: int
    bytes_up: int
    trained_samples: int
    measured: dict[str, float] = field(default_factory=dict)
    """What the client measured of itself and reported (a Flower ClientApp: its process's peak
    resident memory, its training time); recorded as it came, never used for accounting."""


def round_resources(costs: CostTable, exchanges: Sequence[ClientExchange], server_work: Mapping[tuple[str, str], int]) -> dict[str, Any]:
    """The `resources` entry of a round's metrics line: totals, and one record per client."""
    clients = [
        {
            "client": e.client_id,
            "architecture": e.architecture,
            "bytes-down": e.bytes_down,
            "bytes-up": e.bytes_up,
            "trained-samples": e.trained_samples,
            "flops": costs.flops(e.architecture, "train", e.trained_samples),
            **({"measured": dict(e.measured)} if e.measured else {}),
        }
        for e in exchanges
    ]
    return {
        "bytes-down": sum(c["bytes-down"] for c in clients),
        "bytes-up": sum(c["bytes-up"] for c in clients),
        "replies": sum(1 for e in exchanges if e.bytes_up > 0),
        "trained-samples": sum(c["trained-samples"] for c in clients),
        "client-flops": sum(c["flops"] for c in clients),
        "server-flops": costs.server_flops(server_work),
        "per-client": clients,
    }


TOTAL_KEYS = ("bytes-down", "bytes-up", "replies", "trained-samples", "client-flops", "server-flops")


def total_resources(lines: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Sums of the per-round `resources` entries over a run's metrics lines."""
    totals: Counter[str] = Counter({key: 0 for key in TOTAL_KEYS})
    sent = 0
    for line in lines:
        resources = line.get("resources")
        if resources:
            totals.update({key: resources.get(key, 0) for key in TOTAL_KEYS})
            sent += len(resources.get("per-client", []))
    return {**totals, "clients-sent": sent}


def reduction(ours: float, theirs: float) -> float | None:
    """1 - ours / theirs: the fraction saved against a baseline (None when the baseline is 0)."""
    return None if theirs == 0 else 1 - ours / theirs


def reductions_against_fedavg_large(
    costs: CostTable, large: str, client_architectures: Mapping[int, str], totals: Mapping[str, int]
) -> dict[str, Any]:
    """What clients save against FedAvg-large, where the same clients would train, download and
    upload the large model on the same samples.

    Storage and training memory are per architecture and averaged over clients; FLOPs and bytes
    are the run's totals against the same totals for the large model.
    """
    large_cost = costs[large]
    share = Counter(client_architectures.values())
    n_clients = sum(share.values())

    def per_client_mean(field: str) -> float:
        return sum(getattr(costs[arch], field) * count for arch, count in share.items()) / n_clients

    per_architecture = {
        arch: {
            "storage": reduction(costs[arch].state_bytes, large_cost.state_bytes),
            "training-flops-per-sample": reduction(costs[arch].train_flops_per_sample, large_cost.train_flops_per_sample),
            "training-memory": reduction(costs[arch].train_memory_bytes, large_cost.train_memory_bytes),
        }
        for arch in sorted(share)
    }
    return {
        "storage": reduction(per_client_mean("state_bytes"), large_cost.state_bytes),
        "training-memory": reduction(per_client_mean("train_memory_bytes"), large_cost.train_memory_bytes),
        "client-flops": reduction(totals["client-flops"], totals["trained-samples"] * large_cost.train_flops_per_sample),
        "bytes-down": reduction(totals["bytes-down"], totals["clients-sent"] * large_cost.state_bytes),
        "bytes-up": reduction(totals["bytes-up"], totals["replies"] * large_cost.state_bytes),
        "per-architecture": per_architecture,
    }


def resources_summary(
    costs: CostTable, large: str, client_architectures: Mapping[int, str], lines: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The content of resources.json: per-architecture costs, the run's totals and the reductions."""
    totals = total_resources(lines)
    architectures = sorted({large, *client_architectures.values()})
    return {
        "architectures": {arch: costs[arch].as_dict() for arch in architectures},
        "client-architectures": dict(sorted(Counter(client_architectures.values()).items())),
        "input": [costs.spec.channels, costs.spec.image_size, costs.spec.image_size],
        "classes": costs.spec.num_classes,
        "train-memory-method": TRAIN_MEMORY_METHOD,
        "totals": totals,
        "reductions-vs-fedavg-large": reductions_against_fedavg_large(costs, large, client_architectures, totals),
    }
