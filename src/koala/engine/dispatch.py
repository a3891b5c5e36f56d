"""The contract between the run loop and an engine. An engine's one job is to deliver the round's
tasks to the sampled clients and bring their replies back: it is a `Dispatch`, and returns the
round's `Replies`. Sampling, validation, the server step, evaluation, accounting and the run
directory are the run loop's (koala.run.loop), the same whichever engine runs the clients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from koala.accounting.ledger import ClientExchange
from koala.accounting.measure import payload_bytes
from koala.aggregate import validate_metrics
from koala.errors import UpdateRejected
from koala.state import ClientTask, ClientUpdate, ServerState

CLIENT_MEASUREMENTS = ("peak-rss-mb", "train-seconds")
"""What a client may report of its own footprint beside its update (a Flower ClientApp does): kept
per client in the round's metrics line, under `measured`."""


@dataclass
class Replies:
    """What came back from the round's clients, as the engine saw it."""

    updates: list[ClientUpdate] = field(default_factory=list)
    exchanges: list[ClientExchange] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def received(self, task: ClientTask, update: ClientUpdate) -> None:
        """Record a client's update, and the bytes and training its exchange cost; a reply whose
        metrics are not what a client reports is recorded as a failure instead."""
        try:
            validate_metrics(task.client_id, update.metrics)
        except UpdateRejected as exc:
            self.fail(task.client_id, str(exc), sent=task)
            return
        self.updates.append(update)
        measured = {k: v for k, v in update.metrics.items() if k in CLIENT_MEASUREMENTS}
        self.exchanges.append(ClientExchange(
            task.client_id, task.architecture, payload_bytes(task.state), payload_bytes(update.state),
            int(update.metrics["trained-samples"]), measured,
        ))

    def fail(self, client_id: int, reason: str, sent: ClientTask | None = None) -> None:
        """Record a sampled client that produced no usable update (unreachable, crashed, timed out,
        or sent something that is not an update); updates that fail validation are `rejected` instead.
        `sent` is the task when it did go out: its download is accounted for."""
        self.failures.append({"client": client_id, "reason": reason})
        if sent is not None:
            self.exchanges.append(ClientExchange(client_id, sent.architecture, payload_bytes(sent.state), 0, 0))


Dispatch = Callable[[ServerState, list[int], int], Replies]
"""(server state, sampled client ids, round number) -> the replies of that round."""


Dispatch = Callable[[ServerState, list[int], int], Replies]
"""(server state, sampled client ids, round number) -> the replies of that round."""
