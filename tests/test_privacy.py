"""User-level DP of the uploads (DP-FedAvg per architecture) and its accounting with dp-accounting."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import BASE, DIGITS
from interruption import interrupt_run

from koala.config import load_config
from koala.errors import ConfigError
from koala.privacy import PrivacySettings, private_average, resolve_privacy
from koala.run.launch import run_local
from koala.run.run_dir import read_metrics, without_times
from koala.state import ClientUpdate

PRIVATE = [*DIGITS, "data.num-clients=20", "data.min-client-size=10", "models.large='lenet'", "client.lr=0.05",
           "client.participation=0.5", "client.sampling='poisson'", "client.max-update-norm=1.0",
           "privacy.noise-multiplier=1.0", "threads=1"]


def _settings(**changes) -> PrivacySettings:
    base = PrivacySettings(noise_multiplier=1.1, clip=1.0, sampling="poisson", rate=0.01, sampled=10, population=1000,
                           accountant="rdp", delta=1e-5)
    return replace(base, **changes)


@pytest.mark.parametrize("sampling, accountant", [("poisson", "rdp"), ("poisson", "pld"), ("fixed-size", "rdp")])
def test_epsilon_is_dp_accountings_own_for_the_same_mechanism(sampling: str, accountant: str) -> None:
    from dp_accounting import dp_event, privacy_accountant
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    settings = _settings(sampling=sampling, accountant=accountant)
    gaussian = dp_event.GaussianDpEvent(1.1)
    if sampling == "poisson":
        event, relation = dp_event.PoissonSampledDpEvent(0.01, gaussian), privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
    else:
        event, relation = dp_event.SampledWithoutReplacementDpEvent(1000, 10, gaussian), \
            privacy_accountant.NeighboringRelation.REPLACE_ONE
    direct = (pld_privacy_accountant.PLDAccountant(relation) if accountant == "pld"
              else rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation))
    direct.compose(event, 500)
    assert settings.epsilon(500) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert settings.epsilon(0) == 0.0 and settings.epsilon(1000) > settings.epsilon(500)


def test_epsilon_matches_the_analytic_gaussian_mechanism_when_every_client_takes_part() -> None:
    # Balle and Wang (ICML 2018), Theorem 8: T rounds of the Gaussian mechanism with noise sigma and
    # sensitivity 1 are one with sigma / sqrt(T), whose exact delta at epsilon is
    # Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s), s = sigma / sqrt(T)
    from scipy.stats import norm

    settings = _settings(noise_multiplier=3.0, rate=1.0, accountant="pld", delta=1e-5)
    epsilon = settings.epsilon(16)
    s = 3.0 / math.sqrt(16)
    delta = norm.cdf(1 / (2 * s) - epsilon * s) - math.exp(epsilon) * norm.cdf(-1 / (2 * s) - epsilon * s)
    assert delta == pytest.approx(1e-5, rel=0.02)  # the PLD accountant is exact up to its discretisation


def test_the_noise_has_the_stated_scale_on_updates_that_change_nothing() -> None:
    settings = _settings(noise_multiplier=2.0, clip=0.5, rate=0.25)
    reference = {"w": torch.zeros(100_000), "count": torch.tensor(7)}
    unchanged = [ClientUpdate(c, "lenet", {k: v.clone() for k, v in reference.items()}, 10) for c in range(3)]
    averaged = private_average(unchanged, {"lenet": reference}, {"lenet": 8}, settings, seed=0, round_number=1)["lenet"]
    noise = averaged.state["w"]
    expected_std = 2.0 * 0.5 / (0.25 * 8)  # sigma x C over the expected number of clients, participation x 8
    assert noise.mean().abs() < 4 * expected_std / math.sqrt(noise.numel())
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
    assert averaged.state["count"].item() == 7 and averaged.num_examples == 8  # public counts only
    again = private_average(unchanged, {"lenet": reference}, {"lenet": 8}, settings, seed=0, round_number=1)["lenet"]
    other = private_average(unchanged, {"lenet": reference}, {"lenet": 8}, settings, seed=0, round_number=2)["lenet"]
    assert torch.equal(again.state["w"], noise) and not torch.equal(other.state["w"], noise)  # seeded, per round


def test_an_architecture_no_client_answered_still_gets_its_noise() -> None:
    settings = _settings(noise_multiplier=1.0, rate=0.5)
    references = {"lenet": {"w": torch.zeros(50)}, "mobilenetv3-small": {"w": torch.zeros(50)}}
    update = ClientUpdate(0, "lenet", {"w": torch.full((50,), 0.01)}, 10)
    averaged = private_average([update], references, {"lenet": 2, "mobilenetv3-small": 2}, settings, 0, 1)
    assert averaged["mobilenetv3-small"].num_clients == 0 and averaged["mobilenetv3-small"].state["w"].abs().sum() > 0


def test_clipping_comes_before_the_noise(tmp_path: Path) -> None:
    from koala.algorithms import RoundMetrics
    from koala.run.experiment import prepare_experiment

    experiment = prepare_experiment(load_config(BASE, PRIVATE))
    algorithm = experiment.algorithm
    state = algorithm.initial_state(RoundMetrics())
    client = algorithm.round_clients(1)[0]
    sent = algorithm.client_weights(state, client)
    huge = ClientUpdate(client, "lenet", {k: v + 50.0 if v.is_floating_point() else v for k, v in sent.items()},
                        experiment.split.client_sizes()[client],
                        {"train-loss": 1.0, "trained-samples": experiment.split.client_sizes()[client]})
    metrics = RoundMetrics()
    [clipped] = algorithm.accept_updates(state, [client], [huge], metrics)
    assert metrics.clipped and metrics.clipped[0]["norm"] > 50
    # the aggregate of the huge update is the aggregate of its clipped version: the noise comes after the clip
    from_huge = algorithm.aggregate(state, [clipped])["lenet"].state
    scaled = ClientUpdate(client, "lenet", {k: sent[k] + (clipped.state[k] - sent[k]) for k in sent}, huge.num_examples)
    assert all(torch.equal(from_huge[k], algorithm.aggregate(state, [scaled])["lenet"].state[k]) for k in sent)


def test_a_private_run_reports_epsilon_every_round_and_is_reproducible(tmp_path: Path) -> None:
    first = run_local(load_config(BASE, [*PRIVATE, "rounds=3"]), tmp_path / "a", echo=lambda _: None)
    again = run_local(load_config(BASE, [*PRIVATE, "rounds=3"]), tmp_path / "b", echo=lambda _: None)
    other = run_local(load_config(BASE, [*PRIVATE, "rounds=3", "seed=1"]), tmp_path / "c", echo=lambda _: None)
    assert without_times(first.metrics) == without_times(again.metrics)
    assert first.metrics[-1]["eval"] != other.metrics[-1]["eval"]
    settings = resolve_privacy(load_config(BASE, [*PRIVATE, "rounds=3"]))
    epsilons = [line["privacy"]["epsilon"] for line in first.metrics[1:]]
    assert epsilons == [round(settings.epsilon(r), 6) for r in (1, 2, 3)] and epsilons[0] < epsilons[1] < epsilons[2]
    summary = first.summary["privacy"]
    assert summary["epsilon"] == epsilons[-1] and summary["delta"] == 0.1 / 20
    assert summary["neighbouring"] == "add or remove one client" and summary["accountant"] == "rdp"


def test_sigma_is_solved_for_a_target_epsilon() -> None:
    config = load_config(BASE, [*PRIVATE[:-2], "privacy.target-epsilon=4.0", "rounds=30"])
    settings = resolve_privacy(config)
    assert settings.noise_multiplier > 0
    assert settings.epsilon(30) <= 4.0 and settings.epsilon(30) == pytest.approx(4.0, rel=0.02)
    assert replace(settings, noise_multiplier=0.95 * settings.noise_multiplier).epsilon(30) > 4.0


def test_resuming_after_a_kill_continues_the_privacy_ledger_exactly(tmp_path: Path) -> None:
    config = load_config(BASE, [*PRIVATE, "rounds=3"])
    reference = run_local(config, tmp_path / "reference", echo=lambda _: None)
    interrupt_run(config, tmp_path / "run", round_number=2)
    resumed = run_local(config, tmp_path / "run", echo=lambda _: None, resume=True)
    assert without_times(read_metrics(tmp_path / "run")) == without_times(reference.metrics)
    assert resumed.summary["privacy"] == reference.summary["privacy"]


@pytest.mark.parametrize("overrides, message", [
    (["client.max-update-norm=0.0"], "privacy needs client.max-update-norm = C > 0"),
    (["distill.teacher='ensemble'"], "distill.teacher = 'ensemble' distils each client's own model"),
    (["algorithm='feddf'"], "algorithm = 'feddf' distils the ensemble of the round's client models"),
    (["algorithm='centralised'"], "algorithm = 'centralised' trains on the clients' pooled data"),
    (["privacy.target-epsilon=2.0"], "give privacy.noise-multiplier or privacy.target-epsilon, not both"),
    (["privacy.delta=0.1"], "privacy.delta = 0.1 is not below 1 / data.num-clients = 0.05"),
])
def test_what_would_break_the_guarantee_is_refused_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(BASE, [*PRIVATE, *overrides])


def test_poisson_sampling_asks_each_client_independently() -> None:
    from koala.sampling import poisson_sample_clients

    counts = [len(poisson_sample_clients(0, r, 1000, 0.1)) for r in range(1, 41)]
    assert 90 < sum(counts) / len(counts) < 110 and len(set(counts)) > 5
    assert poisson_sample_clients(0, 3, 1000, 0.1) == poisson_sample_clients(0, 3, 1000, 0.1)
