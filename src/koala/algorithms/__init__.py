"""Federated methods, each defined once over model state and data (no transport code)."""

from __future__ import annotations

import torch

from koala.algorithms.base import Algorithm, RoundMetrics, ServerData
from koala.algorithms.centralised import CentralisedLarge
from koala.algorithms.fedavg import FedAvgLarge, FedAvgSmall
from koala.algorithms.koala import FedDF, Koala
from koala.config import ExperimentConfig
from koala.models import InputSpec

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (Koala, FedAvgLarge, FedAvgSmall, FedDF, CentralisedLarge)}


def algorithm_class(config: ExperimentConfig) -> type[Algorithm]:
    """The class of the algorithm that `config.algorithm` names."""
    return ALGORITHMS[config.algorithm]


def make_algorithm(config: ExperimentConfig, spec: InputSpec, server_data: ServerData, device: torch.device) -> Algorithm:
    """The algorithm that `config.algorithm` names."""
    return algorithm_class(config)(config, spec, server_data, device)


__all__ = ["ALGORITHMS", "Algorithm", "RoundMetrics", "ServerData", "algorithm_class", "make_algorithm"]
