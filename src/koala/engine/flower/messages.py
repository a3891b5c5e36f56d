"""What travels between the ServerApp and the ClientApps, as Flower records.

A train message carries the model of the client's architecture (`arrays`) and the task (`task`: the
client id, the architecture, the round and the experiment config as TOML, from which the client
derives its own data partition). A reply carries the trained weights (`arrays`) and `metrics`,
with `num-examples` as Flower apps conventionally do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from koala.errors import UpdateRejected
from koala.state import ClientTask, ClientUpdate

ARRAYS, TASK, METRICS = "arrays", "task", "metrics"


@dataclass(frozen=True)
class TrainRequest:
    """A decoded train message."""

    task: ClientTask
    round: int
    experiment_toml: str


def _to_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in state.items()}


def train_content(task: ClientTask, round_number: int, experiment_toml: str) -> RecordDict:
    task_record = ConfigRecord({
        "client-id": task.client_id,
        "architecture": task.architecture,
        "round": round_number,
        "experiment": experiment_toml,
    })
    return RecordDict({ARRAYS: ArrayRecord(_to_cpu(task.state)), TASK: task_record})


def read_train(content: RecordDict) -> TrainRequest:
    task = content.config_records[TASK]
    state = content.array_records[ARRAYS].to_torch_state_dict()
    client_task = ClientTask(int(task["client-id"]), str(task["architecture"]), state)
    return TrainRequest(client_task, int(task["round"]), str(task["experiment"]))


def reply_content(update: ClientUpdate) -> RecordDict:
    metrics = MetricRecord({"num-examples": update.num_examples, "client-id": update.client_id, **update.metrics})
    return RecordDict({
        ARRAYS: ArrayRecord(_to_cpu(update.state)),
        METRICS: metrics,
        TASK: ConfigRecord({"architecture": update.architecture}),
    })


def read_reply(content: RecordDict, client_id: int) -> ClientUpdate:
    """The update in a reply; a reply that is not a koala-fl update is rejected, naming what is
    missing. Its metrics are checked where every engine's replies are (`Replies.received`)."""
    missing = [key for key, records in ((ARRAYS, content.array_records), (METRICS, content.metric_records),
                                        (TASK, content.config_records)) if key not in records]
    if missing:
        raise UpdateRejected(f"client {client_id} replied without {', '.join(missing)}")
    metrics = dict(content.metric_records[METRICS])
    if metrics.get("client-id") != client_id:
        raise UpdateRejected(f"the reply for client {client_id} says it comes from client {metrics.get('client-id')!r}")
    num_examples = metrics.pop("num-examples", None)
    metrics.pop("client-id")
    try:
        state = content.array_records[ARRAYS].to_torch_state_dict()
    except Exception as exc:  # a peer's bytes: whatever fails to decode them rejects the reply, never the run
        raise UpdateRejected(f"client {client_id} sent arrays that cannot be decoded as tensors "
                             f"({type(exc).__name__}: {exc})") from None
    architecture = str(content.config_records[TASK].get("architecture", ""))
    return ClientUpdate(client_id, architecture, state, num_examples, metrics)
