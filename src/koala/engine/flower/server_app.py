"""The ServerApp: the shared run loop, with each round's tasks delivered to SuperNodes over the Grid.

Deployment (`flwr run flower-app CONNECTION --run-config 'config="/abs/exp.toml" out="/abs/run"'`)
uses the module-level `app`; the simulation engine builds its own app around a config it already has.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from koala.accounting import ClientExchange, payload_bytes
from koala.algorithms import ServerState
from koala.config import ExperimentConfig, config_to_toml, load_config
from koala.engine.flower.messages import read_reply, train_content
from koala.engine.rounds import Dispatch, Echo, Replies, RunResult, run_experiment
from koala.errors import ConfigError, UpdateRejected
from koala.experiment import Experiment, prepare_experiment

POLL_INTERVAL = 1.0


def discover_partitions(grid: Grid, config: ExperimentConfig, echo: Echo) -> dict[int, int]:
    """Map client ids (partition ids) to node ids, waiting at most `flower.node-timeout` seconds for
    every partition's SuperNode. A run starts without missing nodes only if enough are there to
    meet `client.min-replies`; their clients then fail whenever they are sampled."""
    wanted = config.data.num_clients
    deadline = time.monotonic() + config.flower.node_timeout
    nodes: dict[int, int] = {}
    answered: set[int] = set()
    while len(nodes) < wanted and time.monotonic() < deadline:
        pending = [node for node in grid.get_node_ids() if node not in answered]
        if not pending:
            time.sleep(POLL_INTERVAL)
            continue
        queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in pending]
        for reply in grid.send_and_receive(queries, timeout=max(deadline - time.monotonic(), POLL_INTERVAL)):
            answered.add(reply.metadata.src_node_id)
            _record_partition(reply, nodes, wanted, echo)
    if len(nodes) < wanted:
        missing = sorted(set(range(wanted)) - set(nodes))
        message = (f"{len(nodes)} of {wanted} SuperNodes connected within flower.node-timeout = "
                   f"{config.flower.node_timeout:g} s; missing partition-id(s) {missing[:20]}")
        if len(nodes) < config.client.min_replies:
            raise ConfigError(message + ": start a SuperNode for each (see the README) or raise the timeout")
        echo(f"warning: {message}; their clients will fail when sampled")
    return nodes


def _record_partition(reply: Message, nodes: dict[int, int], wanted: int, echo: Echo) -> None:
    node = reply.metadata.src_node_id
    if reply.has_error():
        echo(f"warning: SuperNode {node} did not describe its partition: {reply.error.reason}")
        return
    record = reply.content.config_records["partition"]
    partition, num_partitions = int(record["partition-id"]), int(record["num-partitions"])
    if num_partitions != wanted or not 0 <= partition < wanted:
        echo(f"warning: SuperNode {node} holds partition {partition} of {num_partitions}, but the experiment "
             f"has {wanted} clients; it is left out")
    elif partition in nodes:
        echo(f"warning: SuperNodes {nodes[partition]} and {node} both hold partition {partition}; using the first")
    else:
        nodes[partition] = node


def grid_dispatch(grid: Grid, experiment: Experiment, nodes: dict[int, int]) -> Dispatch:
    """Send each sampled client's task to its SuperNode and collect the replies (in client order,
    as the local engine does, so aggregation sums in the same order)."""
    config, algorithm = experiment.config, experiment.algorithm
    experiment_toml = config_to_toml(config)

    def dispatch(state: ServerState, clients: list[int], round_number: int) -> Replies:
        replies = Replies()
        tasks = {cid: algorithm.client_task(state, cid) for cid in clients}
        messages = [
            Message(train_content(tasks[cid], round_number, experiment_toml), dst_node_id=nodes[cid],
                    message_type=MessageType.TRAIN)
            for cid in clients if cid in nodes
        ]
        received = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=config.flower.round_timeout)}
        for cid in clients:
            task = tasks[cid]
            exchange = ClientExchange(cid, task.architecture, payload_bytes(task.state) if cid in nodes else 0, 0, 0)
            reply = received.get(nodes.get(cid, -1))
            if cid not in nodes:
                replies.fail(cid, f"no SuperNode holds partition-id {cid}")
            elif reply is None:
                replies.fail(cid, f"no reply within flower.round-timeout = {config.flower.round_timeout:g} s")
            elif reply.has_error():
                replies.fail(cid, f"the ClientApp failed: {reply.error.reason}")
            else:
                try:
                    update = read_reply(reply.content, cid)
                except UpdateRejected as exc:
                    replies.fail(cid, str(exc))
                else:
                    replies.updates.append(update)
                    exchange = ClientExchange(cid, task.architecture, exchange.bytes_down, payload_bytes(update.state),
                                              int(update.metrics.get("trained-samples", 0)))
            replies.exchanges.append(exchange)
        return replies

    return dispatch


def run_on_grid(grid: Grid, config: ExperimentConfig, out_dir: Path | None, echo: Echo, engine: str) -> RunResult:
    """Prepare the experiment on the server, find the SuperNodes and run every round over the Grid."""
    experiment = prepare_experiment(config)
    nodes = discover_partitions(grid, config, echo)
    return run_experiment(experiment, grid_dispatch(grid, experiment, nodes), out_dir, echo, engine=engine)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: `config` (a TOML file on the server host) and `out` come from the run config."""
    run_config = context.run_config
    if not run_config.get("config"):
        raise ConfigError("no experiment: pass --run-config 'config=\"/path/to/experiment.toml\"' to flwr run")
    config = load_config(Path(str(run_config["config"])).expanduser())
    out = str(run_config.get("out", ""))
    run_on_grid(grid, config, Path(out).expanduser() if out else None, print, engine="flower")
