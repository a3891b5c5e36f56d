"""Setting up an experiment from its config, shared by every engine: data, split, models, algorithm."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from koala.accounting import CostTable
from koala.algorithms import Algorithm, ServerData, algorithm_class, make_algorithm
from koala.config import ExperimentConfig
from koala.data.federated import FederatedSplit, make_federated_split
from koala.data.sources import load_source
from koala.errors import ConfigError
from koala.models import InputSpec, build_model
from koala.vectorised import require_vectorisable


@dataclass(frozen=True)
class Experiment:
    """Everything a run needs, built and checked before any training starts."""

    config: ExperimentConfig
    split: FederatedSplit
    spec: InputSpec
    algorithm: Algorithm
    device: torch.device
    costs: CostTable

    def client_architectures(self) -> dict[int, str]:
        """The architecture every client trains, by client id."""
        return {cid: self.algorithm.client_architecture(cid) for cid in range(self.config.data.num_clients)}

    def describe(self) -> dict[str, object]:
        """The facts printed before round 1 and kept in the summary."""
        models = self.config.models
        return {
            "algorithm": self.config.algorithm,
            "mode": "heterogeneous" if models.heterogeneous else "homogeneous",
            "dataset": self.config.data.dataset,
            "large": models.large,
            "small": dict(sorted(Counter(self.algorithm.assignment).items())),
            "split": self.split.describe(),
            "device": str(self.device),
        }


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch sees no GPU here; set device = 'cpu'")
    return torch.device(name)


def prepare_experiment(config: ExperimentConfig) -> Experiment:
    """Load and split the data, check the models and build the algorithm (nothing written yet)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    source = load_source(config.data.dataset, Path(config.data.dir).expanduser() if config.data.dir else None)
    split = make_federated_split(source, config.data, config.seed).to(device)
    spec = InputSpec(source.channels, source.image_size, source.num_classes)
    pooled = split.client_pool.subset(torch.cat(split.client_indices)) if algorithm_class(config).pools_client_data else None
    server_data = ServerData(split.proxy_images, split.labelled_server, split.test, pooled, split.validation)
    algorithm = make_algorithm(config, spec, server_data, device)
    if config.client.vectorised and not algorithm.pools_client_data:
        for architecture in sorted({algorithm.client_architecture(c) for c in range(split.num_clients)}):
            require_vectorisable(build_model(architecture, spec), architecture)
    costs = CostTable(spec, config.client.batch_size, momentum=config.client.momentum > 0)
    return Experiment(config, split, spec, algorithm, device, costs)
