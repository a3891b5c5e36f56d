"""Starting a run in this process: the experiment set up, the local engine's dispatch, the run loop."""

from __future__ import annotations

from pathlib import Path

from koala.config import ExperimentConfig
from koala.engine.local import local_dispatch
from koala.run.experiment import prepare_experiment
from koala.run.loop import Echo, RunResult, run_experiment


def run_local(config: ExperimentConfig, out_dir: Path | None = None, echo: Echo = print, resume: bool = False) -> RunResult:
    """Run a whole experiment in-process, writing its run directory; returns the metrics and summary.
    With `resume`, `out_dir` is a run directory whose checkpoint the run continues from."""
    experiment = prepare_experiment(config)
    dispatch = local_dispatch(experiment.algorithm, experiment.split)
    return run_experiment(experiment, dispatch, out_dir, echo, engine="local", resume=resume)
