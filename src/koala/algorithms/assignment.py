"""Which small architecture each client holds (heterogeneous mode): by shares or an explicit list."""

from __future__ import annotations

import numpy as np

from koala.algorithms.devices import counts_from_shares
from koala.config import ModelsConfig
from koala.errors import ConfigError
from koala.seeding import numpy_generator


def assign_architectures(models: ModelsConfig, num_clients: int, seed: int) -> list[str]:
    """One small architecture per client id. Shares are turned into client counts by largest
    remainder, and the counts dealt to clients in a seeded random order."""
    if models.assignment:
        unused = [arch for arch in models.small if arch not in models.assignment]
        if unused:
            raise ConfigError(
                f"models.assignment gives no client {unused}: every architecture in models.small needs clients "
                "(its teacher and its forward distillation would serve nobody); assign it, or drop it from models.small"
            )
        return list(models.assignment)
    counts = counts_from_shares(models.small_shares or [1.0 / len(models.small)] * len(models.small), num_clients)
    empty = [arch for arch, count in zip(models.small, counts) if count == 0]
    if empty:
        raise ConfigError(
            f"models.small-shares leaves {empty} without clients among {num_clients}: raise their "
            "shares, add clients, or drop them from models.small"
        )
    archs = np.repeat(np.asarray(models.small), counts)
    order = numpy_generator(seed, "assignment").permutation(num_clients)
    result = [""] * num_clients
    for client, arch in zip(order, archs):
        result[int(client)] = str(arch)
    return result
