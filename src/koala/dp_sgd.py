"""Sample-level differential privacy on the clients: DP-SGD with Opacus, accounted with dp-accounting.

Each client trains with Opacus's per-sample gradients, clipped to `privacy.sample-max-grad-norm`
and noised with `privacy.sample-noise-multiplier` times that norm, on Poisson-sampled batches of
expected size `client.batch-size` (Abadi et al., 2016). The guarantee protects one training example
of one client (add or remove one example). Opacus is the optional extra `dp` (Opacus 1.6.0, which
trains beside torch 2.13); a config that asks for DP-SGD without it is refused.

Two conditions come from per-sample gradients: BatchNorm mixes the samples of a batch, so a model
with BatchNorm has none (such an architecture is refused, naming it); and Opacus's backward hooks
cannot follow in-place activations, so they are switched off in the training copy (the weights
are the same).

The accounting is the smallest client's (the worst: the largest sampling rate), as if it trained
in every round so far: a bound for every client, that needs no per-client state to resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from koala.config import ClientConfig, ExperimentConfig, PrivacyConfig
from koala.data.dataset import ImageSplit
from koala.errors import ConfigError
from koala.models import InputSpec, build_model
from koala.training import TrainOutcome

OPACUS_HINT = "install it with: pip install 'koala-fl[dp]' (or set privacy.sample-noise-multiplier = 0)"


def check_dp_sgd(config: ExperimentConfig, architectures: Iterable[str], spec: InputSpec) -> None:
    """Refuse, before anything runs, what DP-SGD cannot train: Opacus missing, a client model with
    BatchNorm, vectorised client training."""
    if not config.privacy.sample_level:
        return
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError(f"privacy.sample-noise-multiplier needs Opacus, which is not installed: {OPACUS_HINT}") from None
    for architecture in sorted(set(architectures)):
        norms = {type(m).__name__ for m in build_model(architecture, spec).modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        if norms:
            raise ConfigError(
                f"privacy.sample-noise-multiplier: the clients' {architecture} has {', '.join(sorted(norms))}, which "
                "mixes the samples of a batch, so DP-SGD has no per-sample gradient to clip; give the clients a "
                "model without BatchNorm (lenet-narrow, lenet, lenet-wide) or set privacy.sample-noise-multiplier = 0"
            )


def train_dp_sgd(model: nn.Module, data: ImageSplit, settings: ClientConfig, privacy: PrivacyConfig, seed: int) -> TrainOutcome:
    """`settings.epochs` epochs of DP-SGD on `data` (each of ceil(n / batch) steps a Poisson sample of
    expected size `settings.batch_size`). A pure function of its inputs: the sampling and the noise
    draw from torch's generator seeded with `seed` inside a fork, which leaves the global one alone."""
    from opacus import PrivacyEngine

    if settings.epochs == 0 or len(data) == 0:
        return TrainOutcome(float("nan"), 0)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    model.to(memory_format=torch.contiguous_format)  # Opacus's convolution gradients expect it
    dataset = torch.utils.data.TensorDataset(data.images, data.labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    devices = [data.images.device] if data.images.is_cuda else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns that its default generator is not a secure one
        torch.manual_seed(seed)
        engine = PrivacyEngine(accountant="rdp")
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=privacy.sample_noise_multiplier,
            max_grad_norm=privacy.sample_max_grad_norm, poisson_sampling=True)
        private.train()
        total, seen = 0.0, 0
        for _ in range(settings.epochs):
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(labels) == 0:  # an empty Poisson sample: the step is noise alone
                    optimizer.step()
                    continue
                loss = F.cross_entropy(private(images), labels)
                loss.backward()
                optimizer.step()
                total += float(loss) * len(labels)
                seen += len(labels)
        private._close()
    # the samples a client reports (and the accounting counts) are the expected ones: Poisson
    # batches draw each example once an epoch on average
    return TrainOutcome(total / max(seen, 1), settings.epochs * len(data))


@dataclass(frozen=True)
class SamplePrivacy:
    """The clients' DP-SGD guarantee, accounted for the smallest client (the largest sampling rate)
    as if it trained every round: the `PrivacyLedger` of sample-level DP."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    batch_size: int
    epochs: int
    smallest: int
    """The smallest client's number of examples."""

    summary_key = "sample-privacy"

    def epsilon(self, rounds: int) -> float:
        """Epsilon at `delta` after `rounds` rounds, from dp-accounting's RDP accountant (add or remove
        one example, Poisson sampling)."""
        from dp_accounting import dp_event
        from dp_accounting.rdp import rdp_privacy_accountant

        from koala.privacy import quiet_absl

        if rounds == 0:
            return 0.0
        rate = min(1.0, self.batch_size / self.smallest)
        steps = self.epochs * math.ceil(self.smallest / self.batch_size) * rounds
        event: Any = dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(self.noise_multiplier)), steps)
        accountant = rdp_privacy_accountant.RdpAccountant()
        with quiet_absl():
            accountant.compose(event)
            return float(accountant.get_epsilon(self.delta))

    def round_entry(self, rounds: int) -> dict[str, float]:
        """What a round's metrics line records of the guarantee so far."""
        return {"sample-epsilon": round(self.epsilon(rounds), 6)}

    def describe(self, rounds: int) -> dict[str, Any]:
        """What summary.json records of the guarantee after `rounds` rounds."""
        return {"epsilon": round(self.epsilon(rounds), 6), "delta": self.delta, "noise-multiplier": self.noise_multiplier,
                "max-grad-norm": self.max_grad_norm, "client": f"the smallest ({self.smallest} examples), as if it trained "
                "every round", "sampling": "poisson", "accountant": "rdp", "neighbouring": "add or remove one example",
                "unit": "example", "rounds-accounted": rounds}


def resolve_sample_privacy(config: ExperimentConfig, client_sizes: Iterable[int]) -> SamplePrivacy | None:
    """The clients' DP-SGD ledger; None when sample-level DP is off."""
    privacy, client = config.privacy, config.client
    if not privacy.sample_level:
        return None
    return SamplePrivacy(privacy.sample_noise_multiplier, privacy.sample_max_grad_norm, privacy.sample_delta,
                         client.batch_size, client.epochs, min(size for size in client_sizes if size > 0))
