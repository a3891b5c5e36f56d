"""What the tests share: the shipped configs they start from and the overrides that turn the
quickstart into a run of seconds on scikit-learn's digits (real data, installed with the package)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from koala.algorithms import RoundMetrics
from koala.algorithms.client import client_seed, local_train
from koala.run.experiment import Experiment
from koala.state import ClientUpdate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
QUICKSTART = CONFIGS / "quickstart.toml"

DIGITS = ["data.dataset='digits'", "data.train-limit=0", "data.test-limit=0", "data.min-client-size=20"]
"""Any config on all of digits (1,797 8x8 images; the official split has no test images of its own,
so the source sets some aside), clients of at least 20 images."""

DIGITS_KOALA = [*DIGITS, "data.num-clients=4", "data.proxy-fraction=0.3", "models.large='lenet'", "client.lr=0.05",
                "client.batch-size=32", "distill.reverse.lr=0.05", "distill.reverse.batch-size=32"]
"""KOALA on digits with a LeNet as the large model too, 4 clients and a 30 % proxy set, at learning
rates that learn digits in a few rounds."""


def cli_overrides(overrides: Iterable[str]) -> list[str]:
    """The same overrides as `koala run` arguments (`--set KEY=VALUE` each)."""
    return [part for override in overrides for part in ("--set", override)]


def round_one_updates(experiment: Experiment) -> list[ClientUpdate]:
    """Every client's update of round 1, each trained from the experiment's initial state."""
    state = experiment.algorithm.initial_state(RoundMetrics())
    return [
        local_train(experiment.algorithm.client_task(state, cid), experiment.split.client_data(cid), experiment.config,
                    experiment.spec, client_seed(experiment.config, 1, cid))
        for cid in range(experiment.split.num_clients)
    ]
