"""The local engine: every client runs in this process, one after another. The fast path for
research and tests; the algorithm and the run loop are the ones the Flower engine drives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from koala.aggregate import ClientUpdate
from koala.algorithms import ClientTask, ServerState, local_train
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
    recorded as failed, with the exception, and the round goes on without it."""
    config, algorithm = experiment.config, experiment.algorithm

    def dispatch(state: ServerState, clients: list[int], round_number: int) -> Replies:
        replies = Replies()
        for cid in clients:
            task, data = algorithm.client_task(state, cid), experiment.split.client_data(cid)
            try:
                update = client_step(task, data, config, experiment.spec, derive_seed(config.seed, "client", round_number, cid))
            except Exception as exc:  # a client's crash is its own: it must not end the run
                replies.fail(cid, f"the client raised {type(exc).__name__}: {exc}", sent=task)
                continue
            replies.received(task, update)
        return replies

    return dispatch


def run_local(config: ExperimentConfig, out_dir: Path | None = None, echo: Echo = print, resume: bool = False) -> RunResult:
    """Run a whole experiment in-process, writing its run directory; returns the metrics and summary.
    With `resume`, `out_dir` is a run directory whose checkpoint the run continues from."""
    experiment = prepare_experiment(config)
    return run_experiment(experiment, local_dispatch(experiment), out_dir, echo, engine="local", resume=resume)
