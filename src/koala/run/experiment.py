"""Setting up an experiment from its config, shared by every engine: data, split, models, algorithm."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from koala.accounting.measure import CostTable
from koala.algorithms import Algorithm, ServerData, algorithm_class, make_algorithm
from koala.config import ExperimentConfig
from koala.data.dataset import ImageSplit
from koala.data.federated import FederatedSplit, load_federated_split
from koala.device import resolve_device
from koala.dp_sgd import check_dp_sgd, resolve_sample_privacy
from koala.models import InputSpec
from koala.privacy import PrivacyLedger


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

    def privacy_ledgers(self) -> list[PrivacyLedger]:
        """The run's DP guarantees: the uploads' (user-level) and the clients' DP-SGD (sample-level)."""
        ledgers = [self.algorithm.privacy, resolve_sample_privacy(self.config, self.split.client_sizes())]
        return [ledger for ledger in ledgers if ledger is not None]

    def describe(self) -> dict[str, object]:
        """The facts printed before round 1 and kept in the summary."""
        models, small = self.config.models, self.algorithm.trains_small_models
        architectures = Counter(self.algorithm.assignment) if small else Counter()
        return {
            "algorithm": self.config.algorithm,
            # the architectures the clients train, not those the config lists: FedAvg-large is homogeneous
            "mode": "heterogeneous" if len(architectures) > 1 else "homogeneous",
            "dataset": self.config.data.dataset,
            "large": models.large,
            "small": dict(sorted(architectures.items())),
            **({"devices": [plan.describe() for plan in self.algorithm.device_plan]} if self.algorithm.device_plan else {}),
            "split": {**self.split.describe(), **self._guard_size()},
            "device": str(self.device),
        }

    def _guard_size(self) -> dict[str, int]:
        """How many of the labelled server images are the guard's (`distill.reverse-guard-size`)."""
        guard = self.algorithm.server_data.guard
        return {} if guard is None else {"labelled-guard": len(guard)}


def _hold_out_guard(labelled: ImageSplit | None, size: int) -> tuple[ImageSplit | None, ImageSplit | None]:
    """The labelled server set without its last `size` images, and those images (the guard)."""
    if labelled is None or size == 0:
        return labelled, None
    kept = len(labelled) - size
    rest = labelled.subset(torch.arange(kept, device=labelled.labels.device)) if kept else None
    return rest, labelled.subset(torch.arange(kept, len(labelled), device=labelled.labels.device))


def prepare_experiment(config: ExperimentConfig) -> Experiment:
    """Load and split the data, check the models and build the algorithm (nothing written yet)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    split = load_federated_split(config.data, config.seed).to(device)
    spec = split.input_spec
    pooled = split.client_pool.subset(torch.cat(split.client_indices)) if algorithm_class(config).pools_client_data else None
    labelled, guard = _hold_out_guard(split.labelled_server, config.distill.reverse_guard_size)
    server_data = ServerData(split.proxy_images, labelled, split.test, pooled, split.validation,
                             tuple(split.client_sizes()), guard)
    algorithm = make_algorithm(config, spec, server_data, device)
    costs = CostTable(spec, config.client.batch_size, momentum=config.client.momentum > 0)
    experiment = Experiment(config, split, spec, algorithm, device, costs)
    check_dp_sgd(config, experiment.client_architectures().values(), spec)
    return experiment
