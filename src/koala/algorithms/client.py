"""The client's side of every algorithm: the seed of a client's round and its local training. Every
engine calls these, so a client trains the same way wherever it runs."""

from __future__ import annotations

from koala.config import ExperimentConfig
from koala.data.dataset import ImageSplit
from koala.dp_sgd import train_dp_sgd
from koala.models import InputSpec
from koala.seeding import derive_seed
from koala.state import ClientTask, ClientUpdate, StateDict
from koala.training import TrainOutcome, train_supervised
from koala.weights import instantiate, module_state


def client_seed(config: ExperimentConfig, round_number: int, client_id: int) -> int:
    """The seed of `client_id`'s training in `round_number` (its batch order and its layers' randomness)."""
    return derive_seed(config.seed, "client", round_number, client_id)


def local_train(task: ClientTask, data: ImageSplit, config: ExperimentConfig, spec: InputSpec, seed: int) -> ClientUpdate:
    """A client's round: train the received model on its private data with cross-entropy (with
    DP-SGD under `privacy.sample-noise-multiplier`).

    A pure function of (task, data, settings, seed): the same inputs give the same update, wherever
    it runs. The model lives on the device the data is on.
    """
    model = instantiate(task.architecture, spec, task.state, data.images.device)
    if config.privacy.sample_level:
        outcome = train_dp_sgd(model, data, config.client, config.privacy, seed)
    else:
        outcome = train_supervised(model, data, config.client, seed)
    return client_update(task, module_state(model), len(data), outcome)


def client_update(task: ClientTask, state: StateDict, num_examples: int, outcome: TrainOutcome) -> ClientUpdate:
    """The update a client sends back for `task`: its trained weights, sample count and training metrics."""
    metrics = {"train-loss": outcome.loss, "trained-samples": outcome.samples}
    return ClientUpdate(task.client_id, task.architecture, state, num_examples, metrics)
