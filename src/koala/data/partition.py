"""Partitioners: split a pool of labelled examples over clients (IID, Dirichlet over labels, k labels).

Each returns one index array per client into the pool. All draw from a numpy Generator passed in.
"""

from __future__ import annotations

import numpy as np

from koala.errors import DataError


def partition_iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then deal the examples into `num_clients` shards of near-equal size."""
    return [np.sort(shard) for shard in np.array_split(rng.permutation(num_examples), num_clients)]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over clients by proportions drawn from Dir(alpha).

    As in NIID-Bench, a client already holding its fair share gets no more of the next class, and
    the draw is repeated until every client holds at least `min_size` examples.
    """
    num_examples = len(labels)
    if num_examples < num_clients * min_size:
        raise DataError(
            f"cannot give {num_clients} clients at least {min_size} examples each from {num_examples}: "
            "lower data.num-clients or data.min-client-size, or use more data"
        )
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_tries):
        shards = _dirichlet_draw(by_class, num_clients, alpha, rng)
        if shards is not None and min(len(s) for s in shards) >= min_size:
            return shards
    raise DataError(
        f"Dirichlet(alpha={alpha}) did not give every one of {num_clients} clients {min_size} examples "
        f"in {max_tries} draws: raise data.alpha, lower data.num-clients or data.min-client-size"
    )


def _dirichlet_draw(by_class: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray] | None:
    """One draw of `partition_dirichlet`; None when a class's whole mass fell on clients that
    already hold their fair share (possible with a tiny alpha), which the caller redraws."""
    fair_share = sum(len(indices) for indices in by_class) / num_clients
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for indices in by_class:
        indices = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        proportions = np.where(sizes < fair_share, proportions, 0.0)
        if proportions.sum() <= 0:
            return None
        proportions = proportions / proportions.sum()
        cuts = (np.cumsum(proportions) * len(indices)).astype(np.int64)[:-1]
        for client, part in enumerate(np.split(indices, cuts)):
            shards[client].append(part)
            sizes[client] += len(part)
    return [np.sort(np.concatenate(parts)) for parts in shards]


def partition_k_labels(
    labels: np.ndarray, num_clients: int, labels_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds `labels_per_client` classes; each class is shared evenly by its holders."""
    classes = np.unique(labels)
    if labels_per_client > len(classes):
        raise DataError(
            f"data.labels-per-client = {labels_per_client} but the data has only {len(classes)} classes"
        )
    holdings = []
    for client in range(num_clients):
        first = classes[client % len(classes)]
        others = rng.permutation(classes[classes != first])[: labels_per_client - 1]
        holdings.append({first, *others.tolist()})
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = [i for i, held in enumerate(holdings) if c in held]
        if not holders:
            continue
        for client, part in zip(holders, np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(holders))):
            shards[client].append(part)
    result = [np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64) for parts in shards]
    empty = [i for i, shard in enumerate(result) if len(shard) == 0]
    if empty:
        raise DataError(
            f"k-labels partition left clients {empty[:5]} without data: use fewer clients or more data"
        )
    return result


def label_skew(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> float:
    """Label skew of a split: the size-weighted mean total-variation distance between each client's
    label distribution and the pooled one. 0 = every client sees the global mix; 1 = disjoint labels.
    """
    pooled = np.bincount(labels, minlength=num_classes) / len(labels)
    total = sum(len(s) for s in shards)
    skew = 0.0
    for shard in shards:
        local = np.bincount(labels[shard], minlength=num_classes) / len(shard)
        skew += len(shard) / total * 0.5 * np.abs(local - pooled).sum()
    return float(skew)
