"""A run stopped by Ctrl-C in a given round, as the tests of resuming need one."""

from pathlib import Path

import pytest

from koala.config import ExperimentConfig
from koala.engine.local import local_dispatch
from koala.run.experiment import prepare_experiment
from koala.run.loop import run_experiment


def interrupt_run(config: ExperimentConfig, run_dir: Path, round_number: int) -> None:
    """Run `config` into `run_dir` with the local engine until a KeyboardInterrupt in `round_number`."""
    experiment = prepare_experiment(config)
    clients = local_dispatch(experiment.algorithm, experiment.split)

    def interrupted(state, sampled, current_round):
        if current_round == round_number:
            raise KeyboardInterrupt
        return clients(state, sampled, current_round)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, interrupted, run_dir, echo=lambda _: None)
