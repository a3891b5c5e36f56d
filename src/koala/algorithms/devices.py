"""Device profiles: which client is of which device class, and which small model each class can
afford. A class gets the most capable of `models.small` whose training step fits its memory budget
at the client batch size, whose round of training fits its FLOPs budget (for its largest client),
and whose state fits its upload budget, all from the project's own accounting
(koala.accounting.measure)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from koala.accounting.measure import ModelCost
from koala.config import DeviceClassConfig, ExperimentConfig
from koala.errors import ConfigError
from koala.seeding import numpy_generator
from koala.training import samples_per_epoch

MB = 1e6


@dataclass(frozen=True)
class ClassPlan:
    """What one device class trains, and its needs against its budgets (budget 0 = none)."""

    device_class: str
    clients: tuple[int, ...]
    architecture: str
    memory_mb: float
    memory_budget_mb: float
    flops_per_round: float
    flops_budget: float
    upload_mb: float
    upload_budget_mb: float

    def describe(self) -> dict[str, object]:
        """The plan as run directories record it."""
        return {"class": self.device_class, "clients": len(self.clients), "architecture": self.architecture,
                "memory-mb": round(self.memory_mb, 3), "memory-budget-mb": self.memory_budget_mb,
                "flops-per-round": self.flops_per_round, "flops-budget": self.flops_budget,
                "upload-mb": round(self.upload_mb, 3), "upload-budget-mb": self.upload_budget_mb}

    def line(self) -> str:
        """One printed line: class -> architecture -> footprint against its budgets."""
        def against(need: float, budget: float, unit: str) -> str:
            return f"{need:.3g}{unit}" + (f" of {budget:.3g}{unit}" if budget else " (no budget)")

        return (f"device class {self.device_class} ({len(self.clients)} clients) -> {self.architecture}: "
                f"training memory {against(self.memory_mb, self.memory_budget_mb, ' MB')}, "
                f"FLOPs a round {against(self.flops_per_round, self.flops_budget, '')}, "
                f"upload {against(self.upload_mb, self.upload_budget_mb, ' MB')}")


def counts_from_shares(shares: Sequence[float], total: int) -> list[int]:
    """Whole counts that sum to `total`, by largest remainder of `shares` × `total`."""
    exact = np.asarray(shares, dtype=float) * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def device_classes_of_clients(devices: Sequence[DeviceClassConfig], num_clients: int, seed: int) -> list[str]:
    """The device class of every client id: class sizes from the counts (or shares), dealt to the
    clients in a seeded random order."""
    counts = [d.count for d in devices] if devices[0].count else counts_from_shares([d.share for d in devices], num_clients)
    names = [name for device, count in zip(devices, counts) for name in [device.name] * count]
    order = numpy_generator(seed, "devices").permutation(num_clients)
    classes = [""] * num_clients
    for client, name in zip(order, names):
        classes[int(client)] = name
    return classes


def plan_devices(
    config: ExperimentConfig, classes: Sequence[str], cost_of: Callable[[str], ModelCost], client_sizes: Mapping[int, int],
) -> list[ClassPlan]:
    """Each device class's most capable affordable small model, given every client's class; a class
    that no model fits is an error naming the class, its budget and the smallest need."""
    models, epochs, batch = config.models, config.client.epochs, config.client.batch_size
    order = list(models.capability) or sorted(models.small, key=lambda arch: (cost_of(arch).parameters, arch))
    plans = []
    for device in config.devices:
        clients = tuple(c for c, name in enumerate(classes) if name == device.name)
        largest = max((client_sizes.get(c, 0) for c in clients), default=0)
        needs = {
            arch: (cost_of(arch).train_memory_bytes / MB,
                   float(epochs * samples_per_epoch(largest, batch) * cost_of(arch).train_flops_per_sample),
                   cost_of(arch).state_bytes / MB)
            for arch in order
        }
        fitting = [arch for arch in reversed(order) if _fits(needs[arch], device)]
        if not fitting:
            raise ConfigError(_no_model_fits(device, needs, batch))
        chosen = fitting[0]
        memory, flops, upload = needs[chosen]
        plans.append(ClassPlan(device.name, clients, chosen, memory, device.memory_mb, flops, device.flops_per_round,
                               upload, device.upload_mb))
    return plans


def _fits(need: tuple[float, float, float], device: DeviceClassConfig) -> bool:
    memory, flops, upload = need
    return (memory <= device.memory_mb and (not device.flops_per_round or flops <= device.flops_per_round)
            and (not device.upload_mb or upload <= device.upload_mb))


def _no_model_fits(device: DeviceClassConfig, needs: Mapping[str, tuple[float, float, float]], batch: int) -> str:
    smallest_memory = min(needs.items(), key=lambda item: item[1][0])
    message = (f"device class {device.name!r} fits no model of models.small: its training-memory budget is "
               f"{device.memory_mb:g} MB, and the smallest need is {smallest_memory[1][0]:.3g} MB "
               f"({smallest_memory[0]} at client.batch-size {batch})")
    if device.flops_per_round:
        arch, (_, flops, _) = min(needs.items(), key=lambda item: item[1][1])
        message += f"; its FLOPs budget is {device.flops_per_round:.3g} a round, the smallest need {flops:.3g} ({arch})"
    if device.upload_mb:
        arch, (_, _, upload) = min(needs.items(), key=lambda item: item[1][2])
        message += f"; its upload budget is {device.upload_mb:g} MB, the smallest need {upload:.3g} MB ({arch})"
    return message + ": raise the budget, lower client.batch-size, or add a smaller model to models.small"
