"""Vectorised client training gives the updates of sequential training, client by client."""

from pathlib import Path

import pytest
import torch
from helpers import BASE, DIGITS_KOALA

from koala.config import OptimizerConfig, load_config
from koala.data.dataset import ImageSplit
from koala.engine.local import local_dispatch
from koala.errors import ConfigError
from koala.models import InputSpec, build_model
from koala.run.experiment import prepare_experiment
from koala.run.launch import run_local
from koala.training import train_supervised
from koala.vectorised import train_stacked


def _pool(n: int, dtype: torch.dtype) -> ImageSplit:
    g = torch.Generator().manual_seed(0)
    return ImageSplit(torch.randn(n, 1, 12, 12, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("architecture, schedule", [("lenet", "constant"), ("lenet", "cosine"),
                                                    ("shufflenetv2-0.5", "constant")])
def test_stacked_training_matches_training_each_client_alone(architecture: str, schedule: str) -> None:
    # Clients of unequal size (33 and 17 examples leave trailing batches of 1, dropped, and of 1+16;
    # 40 is whole batches), different starting weights, momentum, weight decay and 2 epochs. In
    # float64 so that BatchNorm's sensitivity to rounding does not hide a real difference.
    dtype = torch.float64
    spec = InputSpec(1, 12, 10)
    pool = _pool(120, dtype)
    client_indices = [torch.arange(0, 33), torch.arange(33, 50), torch.arange(50, 90), torch.arange(90, 120)]
    states = []
    for k in range(len(client_indices)):
        torch.manual_seed(k)
        states.append({n: v.to(dtype) if v.is_floating_point() else v
                       for n, v in build_model(architecture, spec).state_dict().items()})
    settings = OptimizerConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3, lr_schedule=schedule)
    seeds = [11, 12, 13, 14]

    template = build_model(architecture, spec).to(dtype)
    stacked = train_stacked(template, states, pool, client_indices, settings, seeds)

    for k, (state, outcome) in enumerate(stacked):
        alone = build_model(architecture, spec).to(dtype)
        alone.load_state_dict(states[k])
        expected = train_supervised(alone, pool.subset(client_indices[k]), settings, seeds[k])
        assert outcome.samples == expected.samples
        assert outcome.loss == pytest.approx(expected.loss, rel=1e-6)  # sgd_train sums the loss in float32
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-9)


DIGITS = [*DIGITS_KOALA, "data.num-clients=6", "client.epochs=3", "distill.temperature=1.0",
          "distill.reverse.epochs=5", "rounds=3"]


def test_a_vectorised_run_writes_the_metrics_of_a_sequential_run(tmp_path: Path) -> None:
    # 3 clients a round, stacked 2 at a time: the chunking is exercised too
    runs = {
        mode: run_local(load_config(BASE, [*DIGITS, f"client.vectorised={mode}", "client.participation=0.5",
                                                  "client.vectorised-chunk=2"]),
                        tmp_path / str(mode), echo=lambda _: None)
        for mode in ("false", "true")
    }
    sequential, vectorised = (runs[m].metrics for m in ("false", "true"))
    assert [line.get("clients") for line in sequential] == [line.get("clients") for line in vectorised]
    for a, b in zip(sequential, vectorised):
        for model, result in a.get("eval", {}).items():
            assert b["eval"][model]["accuracy"] == pytest.approx(result["accuracy"], abs=2e-3)
        if "train-loss" in a:
            assert b["train-loss"] == pytest.approx(a["train-loss"], rel=1e-4)
    assert sequential[-1]["eval"]["large"]["accuracy"] > 0.3


def test_vectorised_training_refuses_dropout_before_anything_runs(tmp_path) -> None:
    config = load_config(BASE, [*DIGITS, "client.vectorised=true", "models.small=['mobilenetv3-small']"])
    with pytest.raises(ConfigError, match=r"mobilenetv3-small has dropout \(classifier"):
        run_local(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # the check is the local engine's: the shared set-up accepts the config, as the Flower engines never vectorise
    experiment = prepare_experiment(config)
    with pytest.raises(ConfigError, match="mobilenetv3-small has dropout"):
        local_dispatch(experiment.algorithm, experiment.split)
