"""Sample-level DP-SGD on the clients (Opacus), and its accounting with dp-accounting."""

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import BASE, DIGITS_KOALA

from koala.config import ClientConfig, PrivacyConfig, load_config
from koala.data.dataset import ImageSplit
from koala.dp_sgd import SamplePrivacy, resolve_sample_privacy, train_dp_sgd
from koala.errors import ConfigError
from koala.models import InputSpec
from koala.run.experiment import prepare_experiment
from koala.run.launch import run_local
from koala.weights import initial_state, instantiate, module_state

DP_SGD = [*DIGITS_KOALA, "client.vectorised=false", "privacy.sample-noise-multiplier=0.5",
          "privacy.sample-max-grad-norm=2.0", "threads=1"]
SPEC = InputSpec(1, 8, 10)


def _data(n: int, seed: int = 0) -> ImageSplit:
    generator = torch.Generator().manual_seed(seed)
    return ImageSplit(torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator))


def _one_step(noise: float, clip: float, seed: int = 0, data: ImageSplit | None = None) -> dict[str, torch.Tensor]:
    """The change one DP-SGD step at lr 1 (no momentum) makes to a LeNet, over a batch of 256."""
    start = initial_state("lenet", SPEC, 0)
    model = instantiate("lenet", SPEC, start, "cpu")
    settings = ClientConfig(epochs=1, batch_size=256, lr=1.0, momentum=0.0)
    privacy = PrivacyConfig(sample_noise_multiplier=noise, sample_max_grad_norm=clip)
    train_dp_sgd(model, data if data is not None else _data(256), settings, privacy, seed)
    return {k: v - start[k] for k, v in module_state(model).items() if v.is_floating_point()}


def test_the_noise_has_the_stated_scale() -> None:
    # one step: sum of the clipped per-sample gradients (norm <= 256 C) plus N(0, (sigma C)^2) per
    # coordinate, over the expected batch (256): with sigma = 200 the noise, of standard deviation
    # sigma C / 256 per coordinate, outweighs the gradients by far
    change = torch.cat([v.flatten() for v in _one_step(noise=200.0, clip=1.0).values()])
    expected = 200.0 * 1.0 / 256
    assert change.numel() > 10_000
    assert change.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(change.mean().item()) < 4 * expected / math.sqrt(change.numel())


def test_each_examples_gradient_is_clipped_before_the_noise() -> None:
    # 256 copies of one example: every per-sample gradient is the same, far above C in norm, so
    # with almost no noise the step is that gradient clipped to C, times the Poisson batch's size
    # over the expected 256 (within 0.8-1.2 here); unclipped it would be orders of magnitude larger
    same = ImageSplit(_data(1).images.repeat(256, 1, 1, 1), _data(1).labels.repeat(256))
    for clip in (1e-3, 1e-2):
        change = torch.cat([v.flatten() for v in _one_step(noise=1e-6, clip=clip, data=same).values()])
        assert 0.8 * clip < change.norm().item() < 1.2 * clip


def test_dp_sgd_is_a_pure_function_of_its_seed_and_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    first, again, other = _one_step(1.0, 1.0, seed=3), _one_step(1.0, 1.0, seed=3), _one_step(1.0, 1.0, seed=4)
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_sample_epsilon_is_dp_accountings_own_for_the_smallest_client() -> None:
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    config = load_config(BASE, [*DP_SGD, "privacy.sample-noise-multiplier=1.1", "privacy.sample-delta=1e-5",
                                "client.epochs=2", "client.batch-size=32"])
    ledger = resolve_sample_privacy(config, [900, 0, 300, 500])
    assert ledger is not None and ledger.smallest == 300  # an empty client is not the smallest
    accountant = rdp_privacy_accountant.RdpAccountant()
    steps = 2 * math.ceil(300 / 32) * 5  # the smallest client: 300 examples, 2 epochs, 5 rounds
    accountant.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(32 / 300, dp_event.GaussianDpEvent(1.1)), steps))
    assert ledger.epsilon(5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert ledger.epsilon(0) == 0
    assert ledger.round_entry(5) == {"sample-epsilon": round(ledger.epsilon(5), 6)}
    assert resolve_sample_privacy(load_config(BASE, DIGITS_KOALA), [900]) is None  # off without a noise multiplier
    # an independent implementation: Opacus's own RDP accountant, for q = 0.01, sigma = 4, 10,000 steps
    from opacus.accountants import RDPAccountant

    opacus = RDPAccountant()
    opacus.history = [(4.0, 0.01, 10_000)]
    reference = SamplePrivacy(noise_multiplier=4.0, max_grad_norm=1.0, delta=1e-5, batch_size=600, epochs=1, smallest=60_000)
    assert reference.epsilon(100) == pytest.approx(opacus.get_epsilon(1e-5), rel=0.05)


def test_a_dp_sgd_run_learns_reports_epsilon_every_round_and_is_reproducible(tmp_path: Path) -> None:
    runs = [run_local(load_config(BASE, [*DP_SGD, "rounds=5"]), tmp_path / name, echo=lambda _: None) for name in "ab"]
    lines = runs[0].metrics
    epsilons = [line["privacy"]["sample-epsilon"] for line in lines[1:]]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    ledger = resolve_sample_privacy(load_config(BASE, DP_SGD), prepare_experiment(load_config(BASE, DP_SGD)).split.client_sizes())
    assert epsilons[-1] == pytest.approx(ledger.epsilon(5), abs=1e-6)
    assert runs[0].summary["sample-privacy"]["epsilon"] == pytest.approx(epsilons[-1])
    assert lines[-1]["eval"]["small:lenet"]["accuracy"] > 0.3  # chance is 0.1; 0.48 measured
    assert lines[-1]["train-loss"] < lines[1]["train-loss"] - 0.2
    assert [line["eval"] for line in lines] == [line["eval"] for line in runs[1].metrics]


@pytest.mark.parametrize("overrides, message", [
    (["models.small=['mobilenetv3-small']"], "mobilenetv3-small has BatchNorm2d"),
    (["algorithm='fedavg-large'", "models.large='resnet18-ds'"], "resnet18-ds has BatchNorm2d"),
    (["client.vectorised=true"], "set client.vectorised = false"),
    (["client.lr-schedule='cosine'"], "client.lr-schedule = 'constant'"),
])
def test_what_dp_sgd_cannot_train_is_refused_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match="privacy.sample-noise-multiplier") as refused:
        prepare_experiment(load_config(BASE, [*DP_SGD, *overrides]))
    assert message in str(refused.value)


def test_dp_sgd_without_opacus_is_refused_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # what an environment without the extra sees: ImportError
    with pytest.raises(ConfigError, match=r"pip install 'koala-fl\[dp\]'"):
        prepare_experiment(load_config(BASE, DP_SGD))
