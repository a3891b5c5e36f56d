"""Centralised large: the upper bound. The large model trains on every client's data pooled, as if
privacy allowed it; no client takes part. A round is `client.epochs` epochs over the pooled data
with the clients' optimiser settings, so rounds line up with the federated methods'."""

from __future__ import annotations

from collections.abc import Sequence

from koala.algorithms.base import Algorithm, RoundMetrics
from koala.seeding import derive_seed
from koala.state import ClientUpdate, ServerState
from koala.training import train_supervised
from koala.weights import instantiate, module_state


class CentralisedLarge(Algorithm):
    """The large model trained on the pooled client data, on the server."""

    name = "centralised"
    pools_client_data = True
    trains_small_models = False

    def client_architecture(self, client_id: int) -> str:
        return self.config.models.large

    def round_clients(self, round_number: int) -> list[int]:
        return []

    def initial_state(self, metrics: RoundMetrics) -> ServerState:
        return ServerState(round=0, large=self.initial_large_state(metrics), small={})

    def server_round(self, state: ServerState, updates: Sequence[ClientUpdate], metrics: RoundMetrics) -> ServerState:
        assert state.large is not None and self.server_data.pooled_clients is not None
        round_number, pooled = state.round + 1, self.server_data.pooled_clients
        model = instantiate(self.config.models.large, self.spec, state.large, self.device)
        with metrics.timed("train"):
            outcome = train_supervised(model, pooled, self.config.client, derive_seed(self.config.seed, "centralised", round_number))
        metrics.values["train-loss"] = outcome.loss
        metrics.add_work(self.config.models.large, "train", outcome.samples)
        return ServerState(round_number, module_state(model), {})
