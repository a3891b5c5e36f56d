"""The baselines beside KOALA: FedDF (the client ensemble distilled into the large model, no forward
distillation) and the centralised upper bound (the large model on the pooled client data)."""

import json
from pathlib import Path

from helpers import BASE, DIGITS_KOALA

from koala.config import load_config
from koala.run.experiment import Experiment, prepare_experiment
from koala.run.launch import run_local
from koala.training import samples_per_epoch

DIGITS = [*DIGITS_KOALA, "rounds=3", "client.epochs=3", "distill.temperature=1.0", "distill.reverse.epochs=5"]


def _experiment(*overrides: str) -> Experiment:
    return prepare_experiment(load_config(BASE, [*DIGITS, *overrides]))


def _accuracy(metrics: list[dict], model: str) -> list[float]:
    return [line["eval"][model]["accuracy"] for line in metrics if "eval" in line]


def test_feddf_distils_the_client_ensemble_and_never_distils_forward(tmp_path: Path) -> None:
    result = run_local(load_config(BASE, [*DIGITS, "algorithm='feddf'"]), tmp_path / "run", echo=lambda _: None)
    large = _accuracy(result.metrics, "large")
    assert large[-1] > 0.5 and large[-1] > large[0] + 0.3
    assert all("reverse-loss" in line and not any(k.startswith("forward-loss") for k in line) for line in result.metrics[1:])
    assert result.summary["algorithm"] == "feddf"


def test_centralised_large_trains_on_the_pooled_client_data_without_clients(tmp_path: Path) -> None:
    experiment = _experiment("algorithm='centralised'")
    pooled = experiment.algorithm.server_data.pooled_clients
    assert pooled is not None and len(pooled) == sum(experiment.split.client_sizes())
    assert _experiment().algorithm.server_data.pooled_clients is None  # federated methods never get it
    result = run_local(load_config(BASE, [*DIGITS, "algorithm='centralised'"]), tmp_path / "run", echo=lambda _: None)
    large = _accuracy(result.metrics, "large")
    assert large[-1] > 0.8 and large[-1] > large[0] + 0.5
    large_cost = json.loads((tmp_path / "run" / "resources.json").read_text())["architectures"]["lenet"]
    per_round = experiment.config.client.epochs * samples_per_epoch(len(pooled), experiment.config.client.batch_size)
    for line in result.metrics[1:]:
        assert line["clients"] == 0 and line["resources"]["client-flops"] == 0 and "skipped" not in line
        assert line["resources"]["server-flops"] == per_round * large_cost["train-flops-per-sample"]


def test_feddf_distils_the_mean_logits_of_the_client_models_not_their_average() -> None:
    import torch
    from helpers import round_one_updates

    from koala.aggregate import aggregate_by_architecture
    from koala.algorithms import RoundMetrics
    from koala.training import predict_logits
    from koala.weights import instantiate

    feddf = _experiment("algorithm='feddf'")
    updates = round_one_updates(feddf)
    groups = aggregate_by_architecture(updates)
    targets = feddf.algorithm.teacher_targets(updates, groups, RoundMetrics())
    proxy = feddf.split.proxy_images

    def logits(weights):
        return predict_logits(instantiate("lenet", feddf.spec, weights, "cpu"), proxy)

    ensemble = torch.stack([logits(u.state) for u in updates]).mean(0)
    torch.testing.assert_close(targets, feddf.algorithm.kd.soft_targets(ensemble), rtol=1e-5, atol=1e-6)
    averaged = feddf.algorithm.kd.soft_targets(logits(groups["lenet"].state))
    assert not torch.allclose(targets, averaged, atol=1e-4)  # so removing FedDF's choice of teacher fails here
