"""The local engine: every client runs in this process, one after another, or, with
`client.vectorised`, the clients of each architecture together in one stacked model. The fast path
for research and tests; the algorithm and the run loop are the ones the Flower engine drives."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from koala.algorithms import Algorithm
from koala.algorithms.client import client_seed, client_update, local_train
from koala.config import ExperimentConfig
from koala.data.dataset import ImageSplit
from koala.data.federated import FederatedSplit
from koala.engine.dispatch import Dispatch, Replies
from koala.models import InputSpec, build_model
from koala.state import ClientTask, ClientUpdate, ServerState
from koala.vectorised import require_vectorisable, train_stacked

ClientStep = Callable[[ClientTask, ImageSplit, ExperimentConfig, InputSpec, int], ClientUpdate]
"""What a client does with its task: `local_train`, or a stand-in for a device (e.g. one that fails).
It must not modify the task's tensors in place: in this engine they are the server's own."""


def local_dispatch(algorithm: Algorithm, split: FederatedSplit, client_step: ClientStep = local_train) -> Dispatch:
    """Run each sampled client's step in-process, in client order. A client whose step raises is
    recorded as failed, with the exception, and the round goes on without it. With
    `client.vectorised`, the clients of each architecture train together instead
    (`vectorised_local_train`), which a custom `client_step` cannot be; every architecture is
    checked for it here, before anything is trained."""
    config, spec = algorithm.config, algorithm.spec
    if config.client.vectorised and not algorithm.pools_client_data:
        if client_step is not local_train:
            raise ValueError("a custom client step trains clients one at a time; set client.vectorised = false")
        for architecture in sorted({algorithm.client_architecture(c) for c in range(split.num_clients)}):
            require_vectorisable(build_model(architecture, spec), architecture)

    def dispatch(state: ServerState, clients: list[int], round_number: int) -> Replies:
        replies = Replies()
        for cid in clients:
            task, data = algorithm.client_task(state, cid), split.client_data(cid)
            try:
                update = client_step(task, data, config, spec, client_seed(config, round_number, cid))
            except Exception as exc:  # a client's crash is its own: it must not end the run
                replies.fail(cid, f"the client raised {type(exc).__name__}: {exc}", sent=task)
                continue
            replies.received(task, update)
        return replies

    def dispatch_vectorised(state: ServerState, clients: list[int], round_number: int) -> Replies:
        tasks = [algorithm.client_task(state, cid) for cid in clients]
        by_architecture: dict[str, list[ClientTask]] = {}
        for task in tasks:
            by_architecture.setdefault(task.architecture, []).append(task)
        updates = {}
        for group in by_architecture.values():
            seeds = [client_seed(config, round_number, task.client_id) for task in group]
            trained = vectorised_local_train(group, split, config, spec, seeds)
            updates.update({update.client_id: update for update in trained})
        replies = Replies()
        for task in tasks:  # in client order, as the sequential dispatch replies
            replies.received(task, updates[task.client_id])
        return replies

    return dispatch_vectorised if config.client.vectorised else dispatch


def vectorised_local_train(
    tasks: Sequence[ClientTask], split: FederatedSplit, config: ExperimentConfig, spec: InputSpec, seeds: Sequence[int],
) -> list[ClientUpdate]:
    """`local_train` for several clients of one architecture at once, their models stacked
    (`koala.vectorised.train_stacked`) in chunks of `client.vectorised-chunk`: the same updates
    within float tolerance."""
    architecture = tasks[0].architecture
    template = build_model(architecture, spec).to(split.client_pool.images.device)
    updates = []
    chunk = config.client.vectorised_chunk
    for start in range(0, len(tasks), chunk):
        part, part_seeds = tasks[start : start + chunk], list(seeds[start : start + chunk])
        indices = [split.client_indices[task.client_id] for task in part]
        trained = train_stacked(template, [task.state for task in part], split.client_pool, indices, config.client, part_seeds)
        updates += [client_update(task, state, len(idx), outcome) for task, idx, (state, outcome) in zip(part, indices, trained)]
    return updates
