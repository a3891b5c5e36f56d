"""FedAvg baselines: every client trains the large model (FedAvg-large, the conventional approach),
or only its small model (FedAvg-small: what clients get without the large model)."""

from __future__ import annotations

from collections.abc import Sequence

from koala.algorithms.base import Algorithm, RoundMetrics
from koala.state import ClientUpdate, ServerState, StateDict


class FedAvgLarge(Algorithm):
    """Every client trains the large model; the server averages it."""

    name = "fedavg-large"
    trains_small_models = False

    def client_architecture(self, client_id: int) -> str:
        return self.config.models.large

    def client_weights(self, state: ServerState, client_id: int) -> StateDict:
        assert state.large is not None
        return state.large

    def initial_state(self, metrics: RoundMetrics) -> ServerState:
        return ServerState(round=0, large=self.initial_large_state(metrics), small={})

    def server_round(self, state: ServerState, updates: Sequence[ClientUpdate], metrics: RoundMetrics) -> ServerState:
        with metrics.timed("aggregate"):
            groups = self.aggregate(state, updates)
        large = groups[self.config.models.large].state if groups else state.large
        return ServerState(round=state.round + 1, large=large, small={})


class FedAvgSmall(Algorithm):
    """Clients train their small models; each architecture is averaged within its group, no distillation."""

    name = "fedavg-small"

    def client_architecture(self, client_id: int) -> str:
        return self.assignment[client_id]

    def initial_state(self, metrics: RoundMetrics) -> ServerState:
        return ServerState(round=0, large=None, small=self.initial_small_states(self.small_architectures))

    def server_round(self, state: ServerState, updates: Sequence[ClientUpdate], metrics: RoundMetrics) -> ServerState:
        with metrics.timed("aggregate"):
            groups = self.aggregate(state, updates)
        small = {**state.small, **{arch: group.state for arch, group in groups.items()}}
        return ServerState(round=state.round + 1, large=None, small=small)
