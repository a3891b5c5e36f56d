"""The Flower engine's transport: messages pushed to the SuperNodes over a Flower Grid and their
replies pulled back, the discovery of which node holds which client's partition, and the round's
`Dispatch` built from them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from koala.algorithms import Algorithm
from koala.config import ExperimentConfig, config_to_toml
from koala.engine.dispatch import Dispatch, Replies
from koala.engine.flower.messages import read_reply, train_content
from koala.errors import ConfigError, UpdateRejected
from koala.state import ServerState

Echo = Callable[[str], None]

POLL_INTERVAL = 0.25
"""Seconds between pulls of replies (Flower's own send_and_receive waits 3 s between pulls)."""


def push(grid: Grid, messages: dict[int, Message]) -> dict[str, int]:
    """Push `messages` (by key) and return {message id: key}; a message Flower could not push is left out."""
    keys = list(messages)
    ids = grid.push_messages([messages[key] for key in keys])
    return {message_id: key for message_id, key in zip(ids, keys) if message_id is not None}


def pull(grid: Grid, pending: dict[str, int]) -> dict[int, Message]:
    """The replies available now to `pending` messages, by key; answered ids leave `pending`.
    Replies are matched by the message they answer, not by sender: the SuperLink itself sends the
    error reply when a node is gone or a message expired."""
    replies = {}
    for reply in grid.pull_messages(list(pending)):
        key = pending.pop(reply.metadata.reply_to_message_id, None)
        if key is not None:
            replies[key] = reply
    return replies


def exchange(grid: Grid, messages: dict[int, Message], timeout: float) -> dict[int, Message]:
    """Push `messages` and collect replies until all arrived or `timeout` seconds passed."""
    pending = push(grid, messages)
    deadline = time.monotonic() + timeout
    replies = pull(grid, pending)
    while pending and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        replies.update(pull(grid, pending))
    return replies


def discover_partitions(grid: Grid, config: ExperimentConfig, echo: Echo) -> tuple[dict[int, int], dict[int, str]]:
    """Map client ids (partition ids) to node ids, waiting at most `flower.node-timeout` seconds for
    every partition's SuperNode, and the device classes that nodes name, by client id. Nodes are
    asked as they appear, while earlier ones are still answering. A run starts without missing nodes
    only if enough are there to meet `client.min-replies`; their clients then fail whenever they are
    sampled."""
    wanted = config.data.num_clients
    deadline = time.monotonic() + config.flower.node_timeout
    nodes: dict[int, int] = {}
    classes: dict[int, str] = {}
    asked: set[int] = set()
    pending: dict[str, int] = {}
    while len(nodes) < wanted and time.monotonic() < deadline:
        new = [node for node in grid.get_node_ids() if node not in asked]
        asked.update(new)
        ttl = max(deadline - time.monotonic(), 1.0)
        pending.update(push(grid, {node: Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, ttl=ttl)
                                   for node in new}))
        for node, reply in pull(grid, pending).items():
            _record_partition(node, reply, nodes, classes, wanted, echo)
        time.sleep(POLL_INTERVAL)
    if len(nodes) < wanted:
        missing = sorted(set(range(wanted)) - set(nodes))
        message = (f"{len(nodes)} of {wanted} SuperNodes described their partition within flower.node-timeout = "
                   f"{config.flower.node_timeout:g} s; missing partition-id(s) {missing[:20]}")
        if len(nodes) < config.client.min_replies:
            raise ConfigError(message + ": start a SuperNode for each with --node-config \"partition-id=K "
                              f"num-partitions={wanted}\" (see the README) or raise the timeout")
        echo(f"warning: {message}; their clients will fail when sampled")
    return nodes, classes


@dataclass(frozen=True)
class Partition:
    """What a SuperNode says of itself at discovery: the client it holds, and its device class if its
    node config names one (`device-class`)."""

    partition: int
    num_partitions: int
    device_class: str | None = None


def read_partition(content: RecordDict) -> Partition:
    """A node's answer to the discovery query; ValueError, naming what is wrong, for anything else."""
    record = content.config_records.get("partition")
    if record is None:
        raise ValueError("no 'partition' record")
    try:
        partition, num_partitions = int(record["partition-id"]), int(record["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"partition-id and num-partitions must be integers ({type(exc).__name__}: {exc})") from None
    device_class = record.get("device-class")
    return Partition(partition, num_partitions, None if device_class is None else str(device_class))


def _record_partition(
    node: int, reply: Message, nodes: dict[int, int], classes: dict[int, str], wanted: int, echo: Echo
) -> None:
    if reply.has_error():
        echo(f"warning: SuperNode {node} did not describe its partition: {reply.error.reason}")
        return
    try:
        described = read_partition(reply.content)
    except ValueError as exc:  # a node's description: a bad one leaves the node out, never ends the run
        echo(f"warning: SuperNode {node} sent a partition description that cannot be read ({exc}); it is left out")
        return
    partition, num_partitions = described.partition, described.num_partitions
    if num_partitions != wanted or not 0 <= partition < wanted:
        echo(f"warning: SuperNode {node} was started with partition-id={partition} num-partitions={num_partitions}, "
             f"but the experiment has {wanted} clients; it is left out (restart it with num-partitions={wanted})")
    elif partition in nodes:
        echo(f"warning: SuperNodes {nodes[partition]} and {node} both hold partition {partition}; using the first")
    else:
        nodes[partition] = node
        if described.device_class is not None:
            classes[partition] = described.device_class


def grid_dispatch(grid: Grid, algorithm: Algorithm, nodes: dict[int, int]) -> Dispatch:
    """Send each sampled client's task to its SuperNode and collect the replies (in client order,
    as the local engine does, so aggregation sums in the same order). A task lives no longer than
    the round's timeout, so a slow node never works on a round that is over."""
    config = algorithm.config
    experiment_toml = config_to_toml(config)
    timeout = config.flower.round_timeout

    def dispatch(state: ServerState, clients: list[int], round_number: int) -> Replies:
        replies = Replies()
        tasks = {cid: algorithm.client_task(state, cid) for cid in clients}
        messages = {
            cid: Message(train_content(tasks[cid], round_number, experiment_toml), dst_node_id=nodes[cid],
                         message_type=MessageType.TRAIN, ttl=timeout)
            for cid in clients if cid in nodes
        }
        received = exchange(grid, messages, timeout)
        for cid in clients:
            if cid not in nodes:  # never sent: no traffic to account for
                replies.fail(cid, f"no SuperNode holds partition-id {cid}")
                continue
            task, reply = tasks[cid], received.get(cid)
            if reply is None:
                replies.fail(cid, f"no reply within flower.round-timeout = {timeout:g} s", sent=task)
            elif reply.has_error():
                replies.fail(cid, f"the ClientApp failed: {reply.error.reason}", sent=task)
            else:
                try:
                    replies.received(task, read_reply(reply.content, cid))
                except UpdateRejected as exc:
                    replies.fail(cid, str(exc), sent=task)
                except Exception as exc:  # anything else a peer's reply makes fail is that client's failure
                    replies.fail(cid, f"the reply could not be read ({type(exc).__name__}: {exc})", sent=task)
        return replies

    return dispatch
