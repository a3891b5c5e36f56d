"""The local engine: every client runs in this process, one after another. The fast path for
research and tests; the algorithm and the run loop are the ones the Flower engine drives."""

from __future__ import annotations

from pathlib import Path

from koala.algorithms import ServerState, local_train
from koala.config import ExperimentConfig
from koala.engine.rounds import Dispatch, Echo, Replies, RunResult, run_experiment
from koala.experiment import Experiment, prepare_experiment
from koala.seeding import derive_seed


def local_dispatch(experiment: Experiment) -> Dispatch:
    """Run each sampled client's step in-process, in client order."""
    config, algorithm = experiment.config, experiment.algorithm

    def dispatch(state: ServerState, clients: list[int], round_number: int) -> Replies:
        replies = Replies()
        for cid in clients:
            task, data = algorithm.client_task(state, cid), experiment.split.client_data(cid)
            update = local_train(task, data, config, experiment.spec, derive_seed(config.seed, "client", round_number, cid))
            replies.received(task, update)
        return replies

    return dispatch


def run_local(config: ExperimentConfig, out_dir: Path | None = None, echo: Echo = print) -> RunResult:
    """Run a whole experiment in-process, writing its run directory; returns the metrics and summary."""
    experiment = prepare_experiment(config)
    return run_experiment(experiment, local_dispatch(experiment), out_dir, echo, engine="local")
