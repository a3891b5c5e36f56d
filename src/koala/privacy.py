"""User-level differential privacy of what clients upload: DP-FedAvg within each architecture, and its
accounting with Google's `dp-accounting` library.

The mechanism (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models"):
every accepted update's change to the model it was sent is clipped to L2 norm C
(`client.max-update-norm`, before anything else); the server adds Gaussian noise of standard
deviation sigma x C to each architecture's sum of changes and divides by the group's *expected*
number of clients (participation x its clients: a fixed denominator, so that the average does not
reveal how many took part). A client's data reaches exactly one architecture's sum, so a round is
one subsampled Gaussian mechanism of sensitivity C over all the sums together. Everything the
server does with the averages (reverse and forward distillation on its own proxy set, evaluation)
is post-processing: the large model carries the same guarantee.

Accounting: Poisson sampling (`client.sampling = "poisson"`) is accounted for under the
add/remove-one-client relation; fixed-size sampling as sampling without replacement under the
replace-one-client relation. Every round counts, a skipped one too (conservative).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from koala.aggregate import GroupAggregate
from koala.config import ExperimentConfig
from koala.errors import ConfigError
from koala.seeding import torch_generator
from koala.state import ClientUpdate, StateDict


class PrivacyLedger(Protocol):
    """A run's differential-privacy guarantee, as the run loop reports it: each round's metrics line
    gets `round_entry`, the summary gets `describe` under `summary_key`."""

    summary_key: str

    def epsilon(self, rounds: int) -> float: ...

    def round_entry(self, rounds: int) -> dict[str, float]: ...

    def describe(self, rounds: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PrivacySettings:
    """The resolved mechanism of a run: its noise, clipping, sampling, accountant and delta (the
    `PrivacyLedger` of user-level DP)."""

    noise_multiplier: float
    clip: float
    sampling: str
    rate: float
    sampled: int
    population: int
    accountant: str
    delta: float

    summary_key = "privacy"

    @property
    def neighbouring(self) -> str:
        return "add or remove one client" if self.sampling == "poisson" else "replace one client"

    def event(self, rounds: int) -> Any:
        """The dp-accounting event of `rounds` rounds."""
        from dp_accounting import dp_event

        gaussian = dp_event.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "poisson":
            round_event = dp_event.PoissonSampledDpEvent(self.rate, gaussian)
        else:
            round_event = dp_event.SampledWithoutReplacementDpEvent(self.population, self.sampled, gaussian)
        return dp_event.SelfComposedDpEvent(round_event, rounds)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at `delta` after `rounds` rounds, from dp-accounting's accountant."""
        if rounds == 0:
            return 0.0
        accountant = _accountant(self.accountant, self.sampling)
        with quiet_absl():
            accountant.compose(self.event(rounds))
            return float(accountant.get_epsilon(self.delta))

    def round_entry(self, rounds: int) -> dict[str, float]:
        """What a round's metrics line records of the guarantee so far."""
        return {"epsilon": round(self.epsilon(rounds), 6), "delta": self.delta}

    def describe(self, rounds: int) -> dict[str, Any]:
        """What summary.json records of the guarantee after `rounds` rounds."""
        return {"epsilon": round(self.epsilon(rounds), 6), "delta": self.delta, "noise-multiplier": self.noise_multiplier,
                "clip": self.clip, "sampling": self.sampling, "sampling-rate": self.rate,
                "accountant": self.accountant, "neighbouring": self.neighbouring, "unit": "client",
                "rounds-accounted": rounds}


def _accountant(name: str, sampling: str) -> Any:
    from dp_accounting import privacy_accountant
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    relation = (privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson"
                else privacy_accountant.NeighboringRelation.REPLACE_ONE)
    if name == "pld":
        return pld_privacy_accountant.PLDAccountant(relation)
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)


class quiet_absl:
    """dp-accounting logs through absl when an RDP order fails to converge and is left out (the
    epsilon is then computed from the others): the run's own output is not the place for it."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def resolve_privacy(config: ExperimentConfig) -> PrivacySettings | None:
    """The run's mechanism, with sigma solved for `privacy.target-epsilon` after `rounds` rounds
    when that is what the config gives; None when privacy is off."""
    privacy, client, clients = config.privacy, config.client, config.data.num_clients
    if not privacy.enabled:
        return None
    sampled = client.clients_per_round(clients)
    rate = client.participation if client.sampling == "poisson" else sampled / clients
    delta = privacy.delta or 0.1 / clients
    settings = PrivacySettings(privacy.noise_multiplier, client.max_update_norm, client.sampling, rate, sampled, clients,
                               privacy.accountant, delta)
    if privacy.target_epsilon:
        settings = _with_noise(settings, solve_noise_multiplier(settings, privacy.target_epsilon, config.rounds))
    return settings


def _with_noise(settings: PrivacySettings, sigma: float) -> PrivacySettings:
    from dataclasses import replace

    return replace(settings, noise_multiplier=sigma)


def solve_noise_multiplier(settings: PrivacySettings, target_epsilon: float, rounds: int) -> float:
    """The smallest sigma whose epsilon after `rounds` rounds is at most `target_epsilon` (dp-accounting's
    `calibrate_dp_mechanism`)."""
    from dp_accounting import mechanism_calibration

    def event(sigma: float) -> Any:
        return _with_noise(settings, sigma).event(rounds)

    try:
        with quiet_absl():
            return float(mechanism_calibration.calibrate_dp_mechanism(
                lambda: _accountant(settings.accountant, settings.sampling), event, target_epsilon, settings.delta,
                mechanism_calibration.ExplicitBracketInterval(0.05, 500.0), tol=1e-4,
            ))
    except (ValueError, mechanism_calibration.NoBracketIntervalFoundError) as exc:
        raise ConfigError(f"privacy.target-epsilon = {target_epsilon:g} cannot be reached after {rounds} rounds with "
                          f"sigma up to 500 ({exc}): raise the target or lower the rounds or the participation") from None


def private_average(
    updates: Sequence[ClientUpdate], references: Mapping[str, StateDict], group_clients: Mapping[str, int],
    settings: PrivacySettings, seed: int, round_number: int,
) -> dict[str, GroupAggregate]:
    """DP-FedAvg of every architecture in `references` (the models its clients were sent), each
    group's noisy sum of (already clipped) changes divided by its expected count of clients,
    `rate` x `group_clients[arch]`. A group no sampled client answered still gets its noise: that it
    was empty must not show. Integer buffers (BatchNorm's batch counter) stay as they were sent."""
    result = {}
    for arch, reference in references.items():
        members = [u for u in updates if u.architecture == arch]
        expected = settings.rate * group_clients[arch]
        state: StateDict = {}
        for name, sent in reference.items():
            if not sent.is_floating_point():
                state[name] = sent.clone()
                continue
            total = torch.zeros(sent.shape, dtype=torch.float64)
            for update in members:
                total += (update.state[name].to("cpu", torch.float64) - sent.to("cpu", torch.float64))
            # a stream per tensor: the noise does not depend on the order a state dict lists its tensors in
            noise = torch_generator(seed, "privacy-noise", round_number, arch, name)
            total += torch.randn(sent.shape, generator=noise, dtype=torch.float64) * (settings.noise_multiplier * settings.clip)
            state[name] = (sent.to("cpu", torch.float64) + total / expected).to(sent.dtype).to(sent.device)
        # the fusion weighs architectures by their (public) number of clients, never by what was reported
        result[arch] = GroupAggregate(state=state, num_examples=group_clients[arch], num_clients=len(members))
    return result
