"""Which clients a round asks, and which of them drop out: seeded draws over client ids, each from
a stream of its own so that neither shifts any other random stream."""

from __future__ import annotations

import torch

from koala.seeding import numpy_generator, torch_generator


def sample_clients(seed: int, round_number: int, num_clients: int, count: int) -> list[int]:
    """The round's `count` clients: a seeded draw over the sorted client ids, returned sorted."""
    order = torch.randperm(num_clients, generator=torch_generator(seed, "sample", round_number))
    return sorted(order[:count].tolist())


def poisson_sample_clients(seed: int, round_number: int, num_clients: int, rate: float) -> list[int]:
    """The round's clients when each is asked independently with probability `rate` (Poisson
    sampling; the count varies from round to round, and may be 0), from a stream of its own."""
    draws = numpy_generator(seed, "poisson-sample", round_number).random(num_clients)
    return [cid for cid in range(num_clients) if draws[cid] < rate]


def unreachable_clients(seed: int, round_number: int, clients: list[int], probability: float) -> list[int]:
    """The sampled clients that drop out of the round (simulated failures): each independently with
    `probability`, from a stream of its own, so dropout never shifts sampling or training."""
    if probability == 0:
        return []
    draws = numpy_generator(seed, "dropout", round_number).random(len(clients))
    return [cid for cid, draw in zip(clients, draws) if draw < probability]
