"""KOALA: clients train small models; the server reverse-distils them into the large model on the
proxy set, then forward-distils the large model back into every small architecture.

Homogeneous mode is the special case of a single small architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from koala.aggregate import ClientUpdate, GroupAggregate, StateDict, aggregate_by_architecture
from koala.algorithms.base import Algorithm, RoundMetrics, ServerState
from koala.algorithms.models import instantiate, module_state
from koala.distill import fusion_rule, soft_targets
from koala.seeding import derive_seed
from koala.training import predict_logits, train_distill, trained_samples


class Koala(Algorithm):
    """The KOALA round (DESIGN.md §1): aggregate per architecture, reverse KD, forward KD."""

    name = "koala"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fuse = fusion_rule(self.config.distill.fusion)

    def client_architecture(self, client_id: int) -> str:
        return self.assignment[client_id]

    def initial_state(self, metrics: RoundMetrics) -> ServerState:
        return ServerState(
            round=0,
            large=self.initial_large_state(metrics),
            small=self.initial_small_states(self.config.models.small),
        )

    def server_round(self, state: ServerState, updates: Sequence[ClientUpdate], metrics: RoundMetrics) -> ServerState:
        round_number = state.round + 1
        with metrics.timed("aggregate"):
            groups = aggregate_by_architecture(updates)
        small = {**state.small, **{arch: group.state for arch, group in groups.items()}}
        if not groups:
            return ServerState(round_number, state.large, small)
        with metrics.timed("reverse-distill"):
            large_model = self._reverse_distill(state.large, groups, round_number, metrics)
        with metrics.timed("forward-distill"):
            if round_number > self.config.distill.forward_warmup_rounds and self.config.distill.forward.epochs > 0:
                small = self._forward_distill(large_model, small, round_number, metrics)
        return ServerState(round_number, module_state(large_model), small)

    def teacher_targets(self, groups: dict[str, GroupAggregate], metrics: RoundMetrics) -> torch.Tensor:
        """The fused soft targets of the round's aggregated small models on the proxy set."""
        temperature, proxy = self.config.distill.temperature, self.server_data.proxy_images
        probs = []
        for arch, group in groups.items():
            teacher = instantiate(arch, self.spec, group.state, self.device)
            probs.append(soft_targets(predict_logits(teacher, proxy), temperature))
            metrics.add_work(arch, "inference", len(proxy))
        counts = torch.tensor([g.num_examples for g in groups.values()], device=proxy.device)
        return self.fuse(torch.stack(probs), counts)

    def _reverse_distill(self, large: StateDict | None, groups: dict[str, GroupAggregate], round_number: int, metrics: RoundMetrics) -> torch.nn.Module:
        assert large is not None
        distill = self.config.distill
        targets = self.teacher_targets(groups, metrics)
        student = instantiate(self.config.models.large, self.spec, large, self.device)
        proxy = self.server_data.proxy_images
        metrics.values["reverse-loss"] = train_distill(
            student, proxy, targets, distill.temperature, distill.reverse,
            derive_seed(self.config.seed, "reverse-distill", round_number),
        )
        metrics.add_work(self.config.models.large, "train", trained_samples(len(proxy), distill.reverse))
        return student

    def _forward_distill(self, large_model: torch.nn.Module, small: dict[str, StateDict], round_number: int, metrics: RoundMetrics) -> dict[str, StateDict]:
        distill, proxy = self.config.distill, self.server_data.proxy_images
        targets = soft_targets(predict_logits(large_model, proxy), distill.temperature)
        metrics.add_work(self.config.models.large, "inference", len(proxy))
        result = {}
        for arch, weights in small.items():
            student = instantiate(arch, self.spec, weights, self.device)
            metrics.values[f"forward-loss:{arch}"] = train_distill(
                student, proxy, targets, distill.temperature, distill.forward,
                derive_seed(self.config.seed, "forward-distill", round_number, arch),
            )
            metrics.add_work(arch, "train", trained_samples(len(proxy), distill.forward))
            result[arch] = module_state(student)
        return result
