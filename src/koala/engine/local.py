"""The local engine: every client runs in this process, one after another. The fast path for
research and tests; the algorithm and the run loop are the ones the Flower engine drives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from koala.aggregate import ClientUpdate
from koala.algorithms import ClientTask, ServerState, local_train, vectorised_local_train
from koala.config import ExperimentConfig
from koala.data.dataset import ImageSplit
from koala.engine.rounds import Dispatch, Echo, Replies, RunResult, run_experiment
from koala.experiment import Experiment, prepare_experiment
from koala.models import InputSpec
from koala.seeding import derive_seed

ClientStep = Callable[[ClientTask, ImageSplit, ExperimentConfig, InputSpec, int], ClientUpdate]
"""What a client does with its task: `local_train`, or a stand-in for a device (e.g. one that fails).
It must not modify the task's tensors in place: in this engine they are the server's own."""


def local_dispatch(experiment: Experiment, client_step: ClientStep = local_train) -> Dispatch:
    """Run each sampled client's step in-process, in client order. A client whose step raises is
    recorded as failed, with the exception, and the round goes on without it. With
    `client.vectorised`, the clients of each architecture train together instead
    (`vectorised_local_train`), which a custom `client_step` cannot be."""
    config, algorithm = experiment.config, experiment.algorithm
    if config.client.vectorised and client_step is not local_train:
        raise ValueError("a custom client step trains clients one at a time; set client.vectorised = false")

    def seed(cid: int, round_number: int) -> int:
        return derive_seed(config.seed, "client", round_number, cid)

    def dispatch(state: ServerState, clients: list[int], round_number: int) -> Replies:
        replies = Replies()
        for cid in clients:
            task, data = algorithm.client_task(state, cid), experiment.split.client_data(cid)
            try:
                update = client_step(task, data, config, experiment.spec, seed(cid, round_number))
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
            seeds = [seed(task.client_id, round_number) for task in group]
            trained = vectorised_local_train(group, experiment.split, config, experiment.spec, seeds)
            updates.update({update.client_id: update for update in trained})
        replies = Replies()
        for task in tasks:  # in client order, as the sequential dispatch replies
            replies.received(task, updates[task.client_id])
        return replies

    return dispatch_vectorised if config.client.vectorised else dispatch


def run_local(config: ExperimentConfig, out_dir: Path | None = None, echo: Echo = print, resume: bool = False) -> RunResult:
    """Run a whole experiment in-process, writing its run directory; returns the metrics and summary.
    With `resume`, `out_dir` is a run directory whose checkpoint the run continues from."""
    experiment = prepare_experiment(config)
    return run_experiment(experiment, local_dispatch(experiment), out_dir, echo, engine="local", resume=resume)
