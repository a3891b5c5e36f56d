"""The ClientApp: runs the algorithm's client step on the node's own data partition.

A SuperNode is started with `--node-config "partition-id=K num-partitions=N"` (and optionally
`data-dir="..."`, where the node keeps its copy of the data set); partition K is client K of the
experiment's federated split, derived from the config and seed the server sends, so a node trains
on exactly the shard the local engine would give client K.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from koala.accounting.footprint import peak_resident_mb
from koala.algorithms.client import client_seed, local_train
from koala.config import ExperimentConfig, config_from_toml
from koala.data.dataset import ImageSplit
from koala.data.federated import load_federated_split
from koala.device import resolve_device
from koala.engine.flower.messages import read_train, reply_content
from koala.errors import ConfigError
from koala.models import InputSpec

app = ClientApp()


def node_partition(node_config: dict) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, with a clear error when absent."""
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, ValueError):
        raise ConfigError(
            "this SuperNode has no partition: start it with --node-config \"partition-id=K num-partitions=N\""
        ) from None


@lru_cache(maxsize=2)
def _client_data(experiment_toml: str, partition: int, data_dir: str) -> tuple[ImageSplit, InputSpec]:
    """The node's shard (kept while the process lives: simulation actors serve many rounds)."""
    config = config_from_toml(experiment_toml, "the experiment config sent by the server")
    split = load_federated_split(config.data, config.seed, data_dir).to(resolve_device(config.device))
    return split.client_data(partition), split.input_spec


def _check_partition(config: ExperimentConfig, client_id: int, partition: int, num_partitions: int) -> None:
    if num_partitions != config.data.num_clients:
        raise ConfigError(
            f"this SuperNode was started with num-partitions={num_partitions} but the experiment has "
            f"data.num-clients = {config.data.num_clients}; restart it with num-partitions={config.data.num_clients}"
        )
    if client_id != partition:
        raise ConfigError(f"task for client {client_id} was sent to the SuperNode of partition {partition}")


@app.query()
def describe(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds."""
    partition, num_partitions = node_partition(context.node_config)
    record = ConfigRecord({"partition-id": partition, "num-partitions": num_partitions})
    if "device-class" in context.node_config:  # the node says what device it is: the server plans for it
        record["device-class"] = str(context.node_config["device-class"])
    return Message(RecordDict({"partition": record}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One client round: the received weights trained on this node's partition."""
    request = read_train(message.content)
    config = config_from_toml(request.experiment_toml, "the experiment config sent by the server")
    partition, num_partitions = node_partition(context.node_config)
    _check_partition(config, request.task.client_id, partition, num_partitions)
    if config.threads:
        torch.set_num_threads(config.threads)
    data, spec = _client_data(request.experiment_toml, partition, str(context.node_config.get("data-dir", "")))
    start = time.perf_counter()
    update = local_train(request.task, data, config, spec, client_seed(config, request.round, request.task.client_id))
    # the node's own footprint, for the server's records (koala.engine.dispatch.CLIENT_MEASUREMENTS)
    measured = {"peak-rss-mb": peak_resident_mb(), "train-seconds": time.perf_counter() - start}
    return Message(reply_content(replace(update, metrics={**update.metrics, **measured})), reply_to=message)
