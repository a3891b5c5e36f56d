"""KOALA: clients train small models; the server reverse-distils them into the large model on the
proxy set, then forward-distils the large model back into every small architecture.

Homogeneous mode is the special case of a single small architecture.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import torch

from koala.aggregate import ClientUpdate, GroupAggregate, StateDict, aggregate_by_architecture, fedavg
from koala.algorithms.base import Algorithm, RoundMetrics, ServerState
from koala.algorithms.models import instantiate, module_state
from koala.config import DistillOptimizerConfig
from koala.distill import anchored_targets, fusion_rule, soft_targets, teacher_quality_weight
from koala.seeding import derive_seed
from koala.training import Teacher, evaluate, predict_logits, train_distill


class Koala(Algorithm):
    """The KOALA round (DESIGN.md §1): aggregate per architecture, reverse KD, forward KD."""

    name = "koala"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fuse = fusion_rule(self.config.distill.fusion)

    def client_architecture(self, client_id: int) -> str:
        return self.assignment[client_id]

    def initial_state(self, metrics: RoundMetrics) -> ServerState:
        """The large model's start and fresh small models; with `distill.initial-forward-epochs`,
        the start is first distilled into every small model, so the clients' first models carry it."""
        large = self.initial_large_state(metrics)
        small = self.initial_small_states(self.config.models.small)
        epochs = self.config.distill.initial_forward_epochs
        if epochs:
            settings = self.config.distill.forward.model_copy(update={"epochs": epochs})
            large_model = instantiate(self.config.models.large, self.spec, large, self.device)
            targets = self._large_targets(large_model, metrics)(self.server_data.proxy_images)
            small = {arch: self._distil_small(arch, weights, targets, settings, 0, metrics, None)
                     for arch, weights in small.items()}
        return ServerState(round=0, large=large, small=small)

    def server_round(self, state: ServerState, updates: Sequence[ClientUpdate], metrics: RoundMetrics) -> ServerState:
        round_number = state.round + 1
        with metrics.timed("aggregate"):
            groups = aggregate_by_architecture(updates)
        small = {**state.small, **{arch: group.state for arch, group in groups.items()}}
        if not groups:
            return replace(state, round=round_number, small=small)
        # fresh dicts: the momentum of the round before stays as it was in `state`
        optimizers = {role: dict(buffers) for role, buffers in state.optimizers.items()}
        with metrics.timed("reverse-distill"):
            # augmented batches need the teacher on every view; otherwise its targets once
            if self.config.distill.reverse.augments:
                teacher = self.reverse_teacher(updates, groups, metrics)
            else:
                teacher = self.teacher_targets(updates, groups, metrics)
            large_model = self._reverse_distill(state.large, teacher, round_number, metrics, self._momentum(optimizers, "reverse"))
        with metrics.timed("forward-distill"):
            if self.forward_distills(round_number):
                small = self._forward_distill(large_model, small, round_number, metrics, optimizers)
        return ServerState(round_number, module_state(large_model), small, optimizers)

    def _momentum(self, optimizers: dict[str, StateDict], role: str) -> StateDict | None:
        """The momentum buffers of `role` to carry through this round (created empty), or None when
        `distill.keep-optimizer-state` is off."""
        return optimizers.setdefault(role, {}) if self.config.distill.keep_optimizer_state else None

    @property
    def teacher(self) -> str:
        """Which models teach the large one: "averaged" or "ensemble" (`distill.teacher`)."""
        return self.config.distill.teacher

    def forward_distills(self, round_number: int) -> bool:
        """Whether this round distils the large model back into the small ones."""
        distill = self.config.distill
        return round_number > distill.forward_warmup_rounds and distill.forward.epochs > 0

    def teacher_targets(self, updates: Sequence[ClientUpdate], groups: dict[str, GroupAggregate], metrics: RoundMetrics) -> torch.Tensor:
        """The fused soft targets of the round's teachers on the proxy set: per architecture, the
        logits of its averaged model, or the mean logits of its clients' models (one model is
        built at a time); then the architectures' softened outputs are fused."""
        members = {arch: self._built(arch, states) for arch, states in self._teacher_weights(updates, groups).items()}
        return self._fused_probs(members, self.server_data.proxy_images, self._sample_counts(groups), metrics)

    def reverse_teacher(self, updates: Sequence[ClientUpdate], groups: dict[str, GroupAggregate], metrics: RoundMetrics) -> Teacher:
        """The same fused teacher as `teacher_targets`, as a function of any images (augmented
        views); its models are built once and held for the round."""
        members = {arch: list(self._built(arch, states)) for arch, states in self._teacher_weights(updates, groups).items()}
        counts = self._sample_counts(groups)  # once: a copy to a GPU on every batch would wait for it
        return lambda images: self._fused_probs(members, images, counts, metrics)

    def _teacher_weights(self, updates: Sequence[ClientUpdate], groups: dict[str, GroupAggregate]) -> dict[str, list[StateDict]]:
        """Per architecture, the weights that teach: its averaged model, or each of its clients' models."""
        if self.teacher == "ensemble":
            return {arch: [u.state for u in updates if u.architecture == arch] for arch in groups}
        return {arch: [group.state] for arch, group in groups.items()}

    def _built(self, arch: str, states: list[StateDict]) -> Iterator[torch.nn.Module]:
        return (instantiate(arch, self.spec, weights, self.device) for weights in states)

    def _sample_counts(self, groups: dict[str, GroupAggregate]) -> torch.Tensor:
        """Each architecture's examples this round, in `groups` order, on the device (the fusion's weights)."""
        return torch.tensor([g.num_examples for g in groups.values()], device=self.device)

    def _fused_probs(
        self, members: dict[str, Iterable[torch.nn.Module]], images: torch.Tensor, sample_counts: torch.Tensor,
        metrics: RoundMetrics,
    ) -> torch.Tensor:
        probs = []
        for arch, models in members.items():
            logits, count = torch.zeros(()), 0
            for model in models:
                logits, count = logits + predict_logits(model, images), count + 1
                metrics.add_work(arch, "inference", len(images))
            probs.append(soft_targets(logits / count, self.config.distill.temperature))
        return self.fuse(torch.stack(probs), sample_counts)

    def _reverse_distill(
        self, large: StateDict | None, teacher: torch.Tensor | Teacher, round_number: int, metrics: RoundMetrics,
        momentum: StateDict | None,
    ) -> torch.nn.Module:
        assert large is not None
        distill = self.config.distill
        student = instantiate(self.config.models.large, self.spec, large, self.device)
        proxy = self.server_data.proxy_images
        if distill.reverse_selection != "none" or distill.reverse_self_weight:
            teacher = self._anchored(teacher, large, metrics)
        kd_weight = 1.0
        if distill.reverse_kd_scaling == "teacher-quality":
            kd_weight = self._teacher_quality(teacher, student, metrics)
            metrics.values["reverse-kd-weight"] = kd_weight
        outcome = train_distill(
            student, proxy, teacher, distill.temperature, distill.reverse,
            derive_seed(self.config.seed, "reverse-distill", round_number),
            labels=self._proxy_labels(), ce_weight=distill.reverse_ce_weight, momentum=momentum, kd_weight=kd_weight,
        )
        metrics.values["reverse-loss"] = outcome.loss
        metrics.add_work(self.config.models.large, "train", outcome.samples)
        return student

    def _anchored(self, teacher: torch.Tensor | Teacher, large: StateDict, metrics: RoundMetrics) -> torch.Tensor | Teacher:
        """The reverse teacher anchored to the large model as it was before the round
        (`anchored_targets`: confidence selection and self-distillation, no labels)."""
        distill = self.config.distill
        before = instantiate(self.config.models.large, self.spec, large, self.device)
        own = self._large_targets(before, metrics)

        if callable(teacher):
            return lambda images: anchored_targets(
                teacher(images), own(images), distill.reverse_selection, distill.reverse_self_weight
            )
        own_probs = own(self.server_data.proxy_images)
        if distill.reverse_selection == "confidence":  # the share of proxy images where the teachers are kept
            kept = teacher.max(dim=-1).values >= own_probs.max(dim=-1).values
            metrics.values["reverse-teacher-kept"] = float(kept.float().mean())
        return anchored_targets(teacher, own_probs, distill.reverse_selection, distill.reverse_self_weight)

    def _teacher_quality(self, teacher: torch.Tensor | Teacher, student: torch.nn.Module, metrics: RoundMetrics) -> float:
        """`teacher_quality_weight` of the fused teacher against the large model, on the labelled
        server set (the head of the proxy set)."""
        labelled = self.server_data.labelled
        assert labelled is not None  # the config validator guarantees a labelled server set
        targets = teacher(labelled.images) if callable(teacher) else teacher
        teacher_accuracy = float((targets[: len(labelled)].argmax(1) == labelled.labels).float().mean())
        student_accuracy = evaluate(student, labelled)["accuracy"]
        metrics.add_work(self.config.models.large, "inference", len(labelled))
        return teacher_quality_weight(teacher_accuracy, student_accuracy)

    def _proxy_labels(self) -> torch.Tensor | None:
        """One label per proxy image, -1 where the server has none (the labelled set is the first
        `data.proxy-labelled` proxy images); None without a labelled set."""
        labelled, proxy = self.server_data.labelled, self.server_data.proxy_images
        if labelled is None:
            return None
        labels = torch.full((len(proxy),), -1, dtype=torch.long, device=proxy.device)
        labels[: len(labelled)] = labelled.labels
        return labels

    def _forward_distill(
        self, large_model: torch.nn.Module, small: dict[str, StateDict], round_number: int, metrics: RoundMetrics,
        optimizers: dict[str, StateDict],
    ) -> dict[str, StateDict]:
        distill = self.config.distill
        teacher = self._large_targets(large_model, metrics)
        # unaugmented, the large model's targets are computed once for every small architecture
        targets = teacher if distill.forward.augments else teacher(self.server_data.proxy_images)
        result = {}
        for arch, weights in small.items():
            distilled = self._distil_small(
                arch, weights, targets, distill.forward, round_number, metrics, self._momentum(optimizers, f"forward:{arch}")
            )
            mix = distill.forward_mix
            result[arch] = distilled if mix == 1 else fedavg([distilled, weights], [mix, 1 - mix])
        return result

    def _large_targets(self, large_model: torch.nn.Module, metrics: RoundMetrics) -> Teacher:
        """The large model as forward distillation's teacher: its softened outputs on any images."""

        def teacher(images: torch.Tensor) -> torch.Tensor:
            metrics.add_work(self.config.models.large, "inference", len(images))
            return soft_targets(predict_logits(large_model, images), self.config.distill.temperature)

        return teacher

    def _distil_small(
        self, arch: str, weights: StateDict, targets: torch.Tensor | Teacher, settings: DistillOptimizerConfig,
        round_number: int, metrics: RoundMetrics, momentum: StateDict | None,
    ) -> StateDict:
        """`weights` of `arch` after distilling the large model's targets into them on the proxy set."""
        student = instantiate(arch, self.spec, weights, self.device)
        outcome = train_distill(
            student, self.server_data.proxy_images, targets, self.config.distill.temperature, settings,
            derive_seed(self.config.seed, "forward-distill", round_number, arch), momentum=momentum,
        )
        metrics.values[f"forward-loss:{arch}"] = outcome.loss
        metrics.add_work(arch, "train", outcome.samples)
        return module_state(student)


class FedDF(Koala):
    """FedDF (Lin et al., 2020) in KOALA's setting: the mean logits of the round's client models are
    distilled into the large model; the small models are only averaged (no forward distillation)."""

    name = "feddf"

    @property
    def teacher(self) -> str:
        return "ensemble"

    def forward_distills(self, round_number: int) -> bool:
        return False
