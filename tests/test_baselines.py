"""The baselines beside KOALA: FedDF (the client ensemble distilled into the large model, no forward
distillation) and the centralised upper bound (the large model on the pooled client data)."""

from pathlib import Path

from helpers import DIGITS_KOALA, QUICKSTART

from koala.config import load_config
from koala.run.experiment import Experiment, prepare_experiment
from koala.run.launch import run_local

DIGITS = [*DIGITS_KOALA, "rounds=3", "client.epochs=3", "distill.temperature=1.0", "distill.reverse.epochs=5"]


def _experiment(*overrides: str) -> Experiment:
    return prepare_experiment(load_config(QUICKSTART, [*DIGITS, *overrides]))


def _accuracy(metrics: list[dict], model: str) -> list[float]:
    return [line["eval"][model]["accuracy"] for line in metrics if "eval" in line]


def test_feddf_distils_the_client_ensemble_and_never_distils_forward(tmp_path: Path) -> None:
    result = run_local(load_config(QUICKSTART, [*DIGITS, "algorithm='feddf'"]), tmp_path / "run", echo=lambda _: None)
    large = _accuracy(result.metrics, "large")
    assert large[-1] > 0.5 and large[-1] > large[0] + 0.3
    assert all("reverse-loss" in line and not any(k.startswith("forward-loss") for k in line) for line in result.metrics[1:])
    assert result.summary["algorithm"] == "feddf"


def test_centralised_large_trains_on_the_pooled_client_data_without_clients(tmp_path: Path) -> None:
    experiment = _experiment("algorithm='centralised'")
    pooled = experiment.algorithm.server_data.pooled_clients
    assert pooled is not None and len(pooled) == sum(experiment.split.client_sizes())
    assert _experiment().algorithm.server_data.pooled_clients is None  # federated methods never get it
    result = run_local(load_config(QUICKSTART, [*DIGITS, "algorithm='centralised'"]), tmp_path / "run", echo=lambda _: None)
    large = _accuracy(result.metrics, "large")
    assert large[-1] > 0.8 and large[-1] > large[0] + 0.5
    for line in result.metrics[1:]:
        assert line["clients"] == 0 and line["resources"]["client-flops"] == 0 and "skipped" not in line
        assert line["resources"]["server-flops"] > 0
