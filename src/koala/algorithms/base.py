"""What every algorithm is: which clients a round asks, the task each receives, how the server
accepts their updates and folds them in (`server_round`), and how its models are evaluated.

An algorithm is plain functions over model state and data; it knows nothing of transport. Engines
(the local simulator, Flower) ask it what to send each client, run the client step
(koala.algorithms.client) wherever the client is, and hand the replies back to `server_round`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from koala.accounting.measure import CostTable
from koala.aggregate import (
    GroupAggregate,
    aggregate_by_architecture,
    clip_update,
    update_distance,
    validate_update,
)
from koala.algorithms.assignment import assign_architectures
from koala.algorithms.devices import ClassPlan, device_classes_of_clients, plan_devices
from koala.config import ExperimentConfig
from koala.data.dataset import ImageSplit
from koala.errors import UpdateRejected
from koala.models import InputSpec, model_entry
from koala.privacy import private_average, resolve_privacy
from koala.sampling import poisson_sample_clients, sample_clients
from koala.seeding import derive_seed
from koala.state import ClientTask, ClientUpdate, ServerState, StateDict
from koala.training import samples_per_epoch, train_supervised
from koala.weights import (
    evaluate_state,
    initial_state,
    instantiate,
    load_weights,
    module_state,
)

WorkKind = Literal["train", "inference"]


@dataclass(frozen=True)
class ServerData:
    """What the server itself holds: unlabelled proxy images, an optional labelled set, the test set."""

    proxy_images: torch.Tensor
    labelled: ImageSplit | None
    test: ImageSplit
    pooled_clients: ImageSplit | None = None
    """Every client's data pooled: given only to algorithms that declare `pools_client_data` (the
    centralised upper bound), never in a federated setting."""
    validation: ImageSplit | None = None
    """Held-out training images to choose settings on (`data.validation-size`); only evaluated."""
    client_sizes: tuple[int, ...] = ()
    """How many examples each client holds, by client id: what an honest update reports."""
    guard: ImageSplit | None = None
    """Labelled server images whose labels are held out of `labelled` (the proxy images just after
    it) to check each round's reverse distillation (`distill.reverse-guard-size`); only evaluated."""


@dataclass
class RoundMetrics:
    """Server-side measurements of one round, merged into that round's metrics line."""

    values: dict[str, Any] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    clipped: list[dict[str, Any]] = field(default_factory=list)
    """Accepted updates scaled down to `client.max-update-norm`, with their norm as sent."""
    work: Counter[tuple[str, WorkKind]] = field(default_factory=Counter)
    """Server compute of the round: samples passed through each architecture, per kind of pass."""

    def add_work(self, architecture: str, kind: WorkKind, samples: int) -> None:
        """Record `samples` training (forward + backward) or inference passes of `architecture`."""
        self.work[(architecture, kind)] += samples

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.values[f"time-{phase}"] = round(time.perf_counter() - start, 4)


class Algorithm(ABC):
    """The round logic of one federated method."""

    name: str
    pools_client_data = False
    """True for a method that trains on the clients' pooled data (`ServerData.pooled_clients`)."""
    trains_small_models = True
    """Whether the clients train the small models of `models.small` (False: they train the large one,
    or, centralised, nothing)."""

    def __init__(self, config: ExperimentConfig, spec: InputSpec, server_data: ServerData, device: torch.device) -> None:
        for arch in [config.models.large, *config.models.small]:
            model_entry(arch)  # unknown names fail here, before anything is trained or written
        self.config = config
        self.spec = spec
        self.server_data = server_data
        self.device = device
        self.privacy = resolve_privacy(config)
        self.device_plan: list[ClassPlan] = []
        if config.devices:
            self.assign_device_classes(device_classes_of_clients(config.devices, config.data.num_clients, config.seed))
        else:
            self.assignment = assign_architectures(config.models, config.data.num_clients, config.seed)

    def assign_device_classes(self, classes: Sequence[str]) -> None:
        """Give every client the small model its device class can afford (`plan_devices`), the class
        of client id K being `classes[K]`; the plan is kept in `device_plan`."""
        costs = CostTable(self.spec, self.config.client.batch_size, momentum=self.config.client.momentum > 0)
        sizes = dict(enumerate(self.server_data.client_sizes))
        self.device_plan = plan_devices(self.config, classes, costs.__getitem__, sizes)
        architecture = {plan.device_class: plan.architecture for plan in self.device_plan}
        self.assignment = [architecture[name] for name in classes]

    @property
    def small_architectures(self) -> list[str]:
        """The small architectures some client trains, in the order of `models.small` (with device
        classes, a candidate no class can afford, or that a better one beats, is left out)."""
        used = set(self.assignment)
        return [arch for arch in self.config.models.small if arch in used]

    # -- what the server sends ------------------------------------------------------------------
    @abstractmethod
    def client_architecture(self, client_id: int) -> str:
        """The architecture that `client_id` trains."""

    @abstractmethod
    def initial_state(self, metrics: RoundMetrics) -> ServerState:
        """The server state before round 1 (any server work it takes goes into `metrics`)."""

    def client_weights(self, state: ServerState, client_id: int) -> StateDict:
        """The current weights of the model that `client_id` trains (by default its small model)."""
        return state.small[self.client_architecture(client_id)]

    def round_clients(self, round_number: int) -> list[int]:
        """The clients asked in `round_number`: a seeded draw of `client.participation` of them."""
        config = self.config
        if config.client.sampling == "poisson":
            return poisson_sample_clients(config.seed, round_number, config.data.num_clients, config.client.participation)
        return sample_clients(
            config.seed, round_number, config.data.num_clients, config.client.clients_per_round(config.data.num_clients)
        )

    def client_task(self, state: ServerState, client_id: int) -> ClientTask:
        return ClientTask(client_id, self.client_architecture(client_id), self.client_weights(state, client_id))

    # -- what the server does with the replies --------------------------------------------------
    def accept_updates(
        self, state: ServerState, clients: Collection[int], updates: Sequence[ClientUpdate], metrics: RoundMetrics
    ) -> list[ClientUpdate]:
        """The updates that pass validation, each clipped to `client.max-update-norm` when that is set.
        `clients` are the ones asked this round that did not drop out or fail. A rejected update is
        recorded with its reason and left out, so the round goes on as if that client had not replied."""
        accepted: list[ClientUpdate] = []
        replied: set[int] = set()
        max_norm = self.config.client.max_update_norm
        for update in updates:
            try:
                if update.client_id not in clients:
                    raise UpdateRejected(f"client {update.client_id!r} was not asked for an update this round")
                if update.client_id in replied:
                    raise UpdateRejected(f"client {update.client_id} replied more than once this round")
                replied.add(update.client_id)
                reference = self.client_weights(state, update.client_id)
                validate_update(update, self.client_architecture(update.client_id), reference)
                self._check_sample_counts(update)
            except UpdateRejected as exc:
                metrics.rejected.append({"client": update.client_id, "reason": str(exc)})
                continue
            if max_norm and (norm := update_distance(update, reference)) > max_norm:
                update = clip_update(update, reference, max_norm)
                metrics.clipped.append({"client": update.client_id, "norm": norm})
            accepted.append(update)
        return accepted

    def _check_sample_counts(self, update: ClientUpdate) -> None:
        """Reject an update whose sample counts are not those of the client's own data: they weigh it
        in its architecture's FedAvg and in the teachers' fusion, and count in the FLOP ledger."""
        sizes = self.server_data.client_sizes
        if not sizes:
            return
        holds = sizes[update.client_id]
        if update.num_examples != holds:
            raise UpdateRejected(f"client {update.client_id} reported {update.num_examples} examples but holds {holds}: "
                                 "an update must report the size of its own data")
        settings = self.config.client
        trained = settings.epochs * samples_per_epoch(holds, settings.batch_size)
        if update.metrics.get("trained-samples") != trained:
            raise UpdateRejected(
                f"client {update.client_id} reported trained-samples = {update.metrics.get('trained-samples')!r}, but "
                f"{settings.epochs} epoch(s) over its {holds} examples train {trained}"
            )

    def aggregate(self, state: ServerState, updates: Sequence[ClientUpdate]) -> dict[str, GroupAggregate]:
        """The round's accepted updates averaged within each architecture: FedAvg weighted by sample
        count, or, with `[privacy]`, DP-FedAvg over every architecture the clients hold
        (`koala.privacy.private_average`)."""
        if self.privacy is None:
            return aggregate_by_architecture(updates)
        references, clients = {}, Counter()
        for client in range(self.config.data.num_clients):
            architecture = self.client_architecture(client)
            references.setdefault(architecture, self.client_weights(state, client))
            clients[architecture] += 1
        return private_average(updates, references, clients, self.privacy, self.config.seed, state.round + 1)

    @abstractmethod
    def server_round(self, state: ServerState, updates: Sequence[ClientUpdate], metrics: RoundMetrics) -> ServerState:
        """Fold the round's accepted updates into a new server state."""

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, state: ServerState, data: ImageSplit | None = None) -> dict[str, dict[str, float]]:
        """Metrics of the large model (as "large"), of each small model (as "small:ARCH") and of the
        method's `round_models` on `data`, by default the test split."""
        data = self.server_data.test if data is None else data
        models = {"large": (self.config.models.large, state.large)} if state.large is not None else {}
        models |= {f"small:{arch}": (arch, weights) for arch, weights in state.small.items()}
        models |= self.round_models(state)
        return {name: evaluate_state(arch, self.spec, weights, data) for name, (arch, weights) in models.items()}

    def round_models(self, state: ServerState) -> dict[str, tuple[str, StateDict]]:
        """Models of the round that produced `state`, beside its large and small ones, to evaluate
        too, by name: (architecture, weights). None by default."""
        return {}

    # -- shared building blocks -----------------------------------------------------------------
    def initial_large_state(self, metrics: RoundMetrics) -> StateDict:
        """The large model's start: random, a local weights file, or pretrained on the labelled server set."""
        arch, init = self.config.models.large, self.config.large_init
        state = initial_state(arch, self.spec, self.config.seed)
        if init.kind == "file":
            return load_weights(Path(init.path).expanduser(), arch, state)
        if init.kind == "pretrain":
            labelled = self.server_data.labelled
            assert labelled is not None  # the config validator guarantees a labelled server set
            model = instantiate(arch, self.spec, state, self.device)
            outcome = train_supervised(model, labelled, init.pretrain, derive_seed(self.config.seed, "pretrain"))
            metrics.add_work(arch, "train", outcome.samples)
            return module_state(model)
        return state

    def initial_small_states(self, architectures: Sequence[str]) -> dict[str, StateDict]:
        return {arch: initial_state(arch, self.spec, self.config.seed) for arch in architectures}
