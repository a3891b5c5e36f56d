"""Reverse-KD teachers (averaged model or client ensemble) and the FedDF and centralised baselines."""

from pathlib import Path

import pytest
import torch

from koala.aggregate import aggregate_by_architecture
from koala.algorithms import RoundMetrics, local_train
from koala.algorithms.models import instantiate
from koala.config import load_config
from koala.distill import soft_targets
from koala.engine.local import run_local
from koala.experiment import Experiment, prepare_experiment
from koala.seeding import derive_seed
from koala.training import predict_logits

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.toml"
DIGITS = ["data.dataset='digits'", "data.train-limit=0", "data.test-limit=0", "data.min-client-size=20",
          "data.num-clients=4", "data.proxy-fraction=0.3", "models.large='lenet'", "rounds=3", "client.lr=0.05",
          "client.epochs=3", "client.batch-size=32", "distill.temperature=1.0", "distill.reverse.lr=0.05",
          "distill.reverse.epochs=5", "distill.reverse.batch-size=32"]


def _experiment(*overrides: str) -> Experiment:
    return prepare_experiment(load_config(QUICKSTART, [*DIGITS, *overrides]))


def _round_one_updates(experiment: Experiment):
    state = experiment.algorithm.initial_state(RoundMetrics())
    updates = [
        local_train(experiment.algorithm.client_task(state, cid), experiment.split.client_data(cid), experiment.config,
                    experiment.spec, derive_seed(0, "client", 1, cid))
        for cid in range(4)
    ]
    return updates


def _logits(experiment: Experiment, arch: str, weights) -> torch.Tensor:
    return predict_logits(instantiate(arch, experiment.spec, weights, "cpu"), experiment.split.proxy_images)


@pytest.mark.parametrize("teacher", ["averaged", "ensemble"])
def test_teacher_targets_match_a_hand_computation(teacher: str) -> None:
    experiment = _experiment("models.small=['lenet','mobilenetv3-small']", f"distill.teacher='{teacher}'",
                             "distill.fusion='uniform'")
    updates = _round_one_updates(experiment)
    groups = aggregate_by_architecture(updates)
    metrics = RoundMetrics()
    targets = experiment.algorithm.teacher_targets(updates, groups, metrics)

    expected = []
    for arch, group in groups.items():
        if teacher == "averaged":
            logits = _logits(experiment, arch, group.state)
        else:
            logits = torch.stack([_logits(experiment, arch, u.state) for u in updates if u.architecture == arch]).mean(0)
        expected.append(soft_targets(logits, experiment.config.distill.temperature))
    torch.testing.assert_close(targets, torch.stack(expected).mean(0), rtol=1e-5, atol=1e-6)
    proxy = len(experiment.split.proxy_images)
    passes = sum(metrics.work[(arch, "inference")] for arch in groups)
    assert passes == (len(updates) if teacher == "ensemble" else len(groups)) * proxy


def test_the_ensemble_teacher_differs_from_the_averaged_model() -> None:
    experiment = _experiment("models.small=['lenet']")
    updates = _round_one_updates(experiment)
    groups = aggregate_by_architecture(updates)
    averaged = experiment.algorithm.teacher_targets(updates, groups, RoundMetrics())
    ensemble = _experiment("models.small=['lenet']", "distill.teacher='ensemble'").algorithm.teacher_targets(
        updates, groups, RoundMetrics())
    assert not torch.allclose(averaged, ensemble, atol=1e-4)


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
