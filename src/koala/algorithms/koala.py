"""KOALA: clients train small models; the server reverse-distils them into the large model on the
proxy set, then forward-distils the large model back into every small architecture.

Homogeneous mode is the special case of a single small architecture. A round, on the server:

1. the accepted updates are averaged within each architecture (FedAvg);
2. reverse distillation: the round's teachers (each architecture's averaged model, or the mean
   logits of its clients' models) are softened, fused across architectures and distilled into
   the large model on the proxy set, optionally beside cross-entropy on the server's labelled
   images and anchored to the large model's own predictions (`anchored_targets`), and undone when
   it lowers the large model's accuracy on held-out labelled images (`distill.reverse-guard-size`)
   by more than `distill.reverse-guard-tolerance`;
3. forward distillation: the large model's softened outputs are distilled into every small model,
   which the clients receive next round.

Both distillations use every proxy image unless `distill.proxy-split` gives each its own part
(`distillation_sets`), so that the round's teachers are not asked about the images forward
distillation has just fitted their starting model to the large model on (benchmarks/RESULTS.md,
"Why it stays under them": measured, it did not lift the large model).

Evaluation reports, beside the large model and the small models the clients receive next round
("small:ARCH", after forward distillation), each architecture's averaged model of the round before
forward distillation ("averaged:ARCH"): under `distill.teacher = "averaged"` the teacher the large
model learned from this round, which the forward-distilled small model is not. A round that does not
forward-distil (warm-up, FedDF, `forward-mix = 0`) sends the averaged models on, and reports them once.

Names: the round's *teacher* is a function from images to soft targets; *targets* are what
distillation learns from (fixed on the proxy set, or the teacher itself when batches are
augmented: `distillation_targets`); `distill.teacher` in the config is the *teacher kind*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from koala.aggregate import GroupAggregate, fedavg
from koala.algorithms.base import Algorithm, RoundMetrics
from koala.config import DistillOptimizerConfig
from koala.distill import (
    Distillation,
    anchored_targets,
    fusion_rule,
    teacher_quality_weight,
)
from koala.errors import ConfigError
from koala.seeding import derive_seed
from koala.state import ClientUpdate, ServerState, StateDict
from koala.training import (
    TargetFunction,
    Targets,
    distillation_targets,
    evaluate,
    predict_logits,
    train_distill,
)
from koala.weights import instantiate, module_state

REVERSE = "reverse"
"""The optimiser role of reverse distillation; forward distillation's are "forward:ARCH"."""


def distillation_sets(split: str, size: int, labelled: int, round_number: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The indices of the proxy images that round `round_number`'s reverse and forward distillation
    use under `distill.proxy-split` `split` (round 0: the initial forward distillation), of `size`
    proxy images whose first `labelled` are the labelled server set; None when both use every image
    ("shared"). The unlabelled images are cut into two halves; the labelled ones are always reverse's.
    "disjoint": reverse on the labelled images and the first half, forward on the second, every round.
    "alternating": forward on half `round_number` mod 2, reverse on the labelled images and that half,
    so each round's reverse images are not the ones its teachers were last forward-distilled on."""
    if split == "shared":
        return None
    if size - labelled < 2:
        raise ConfigError(f"distill.proxy-split = '{split}' cuts the unlabelled proxy images into two halves, but "
                          f"the proxy set holds {size - labelled} unlabelled image(s) of {size}: raise the proxy set's "
                          "size, lower data.proxy-labelled, or set distill.proxy-split = 'shared'")
    halves = torch.arange(labelled, size).chunk(2)
    reverse_half, forward_half = halves if split == "disjoint" else (halves[round_number % 2],) * 2
    return torch.cat([torch.arange(labelled), reverse_half]), forward_half


def guard_keeps(accuracy_before: float, accuracy_after: float, size: int, tolerance: float) -> bool:
    """Whether a guard of `size` images keeps a round that moved its accuracy from `accuracy_before`
    to `accuracy_after`: the model lost no more than `tolerance` (a fraction) of the images, counted
    in whole images (a tolerance of 2.5 images lets a fall of 2 through, not of 3)."""
    fall = round(accuracy_before * size) - round(accuracy_after * size)  # accuracies are counts over `size`
    return fall <= math.floor(tolerance * size + 1e-9)  # 1e-9: 0.02 * 200 is 4, not 3.9999...


class Koala(Algorithm):
    """The KOALA round: aggregate per architecture, reverse-distil into the large model, forward-distil
    back into the small ones."""

    name = "koala"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fuse = fusion_rule(self.config.distill.fusion)
        self.kd = Distillation(self.config.distill.temperature)
        self._averaged: tuple[int, dict[str, StateDict]] = (-1, {})
        """The last round's number and its averaged model per architecture, before forward distillation."""
        self._split_by_parity = [distillation_sets(self.config.distill.proxy_split, len(self.server_data.proxy_images),
                                                   self.config.data.proxy_labelled, parity) for parity in (0, 1)]
        """`distillation_sets` of even and odd rounds, made (and a proxy set too small to split refused) before anything runs."""

    def client_architecture(self, client_id: int) -> str:
        return self.assignment[client_id]

    @property
    def teacher_kind(self) -> str:
        """Which models teach the large one (`distill.teacher`): "averaged" or "ensemble"."""
        return self.config.distill.teacher

    def forward_distills(self, round_number: int) -> bool:
        """Whether this round distils the large model back into the small ones."""
        distill = self.config.distill
        return round_number > distill.forward_warmup_rounds and distill.forward.epochs > 0

    # -- the start and the round ----------------------------------------------------------------
    def initial_state(self, metrics: RoundMetrics) -> ServerState:
        """The large model's start and fresh small models; with `distill.initial-forward-epochs`,
        the start is first distilled into every small model, so the clients' first models carry it."""
        large = self.initial_large_state(metrics)
        small = self.initial_small_states(self.small_architectures)
        epochs = self.config.distill.initial_forward_epochs
        if epochs:
            settings = self.config.distill.forward.model_copy(update={"epochs": epochs})
            large_model = instantiate(self.config.models.large, self.spec, large, self.device)
            _, images = self.distillation_images(0)
            targets = distillation_targets(self._large_teacher(large_model, metrics), images, settings)
            small = {arch: self._distil_small(arch, weights, images, targets, settings, 0, metrics, None)[0]
                     for arch, weights in small.items()}
        return ServerState(round=0, large=large, small=small)

    def server_round(self, state: ServerState, updates: Sequence[ClientUpdate], metrics: RoundMetrics) -> ServerState:
        """Round `state.round + 1` on the server: average the accepted `updates` per architecture,
        reverse-distil the fused teachers into the large model, then forward-distil it into every
        small model. Without updates only the round advances. Momentum buffers of the
        distillations come back in the new state when `distill.keep-optimizer-state` is on."""
        round_number = state.round + 1
        with metrics.timed("aggregate"):
            groups = self.aggregate(state, updates)
        small = {**state.small, **{arch: group.state for arch, group in groups.items()}}
        if not groups:
            return ServerState(round_number, state.large, small, state.optimizers)
        if self.forward_distills(round_number) and self.config.distill.forward_mix > 0:
            # the small models the clients receive will differ from the averaged ones: evaluate both
            self._averaged = (round_number, {arch: group.state for arch, group in groups.items()})
        momentum = dict(state.optimizers)
        with metrics.timed("reverse-distill"):
            large_model, momentum[REVERSE] = self._reverse_distill(state, updates, groups, round_number, metrics)
            if self.server_data.guard is not None:
                previous = instantiate(self.config.models.large, self.spec, state.large, self.device)
                if not self._guard_keeps(large_model, previous, metrics):
                    # the round's distillation is undone: the large model and its momentum as they were
                    large_model, momentum = previous, dict(state.optimizers)
        with metrics.timed("forward-distill"):
            if self.forward_distills(round_number):
                # the large model's targets are made once, for every small architecture
                _, images = self.distillation_images(round_number)
                targets = distillation_targets(self._large_teacher(large_model, metrics), images, self.config.distill.forward)
                for arch, weights in small.items():
                    small[arch], momentum[f"forward:{arch}"] = self._forward_distill(
                        arch, weights, images, targets, state, round_number, metrics
                    )
        kept = momentum if self.config.distill.keep_optimizer_state else {}
        return ServerState(round_number, module_state(large_model), small, kept)

    def round_models(self, state: ServerState) -> dict[str, tuple[str, StateDict]]:
        """After a round that averaged updates and forward-distilled, each architecture's averaged
        model of that round, as "averaged:ARCH"."""
        averaged_round, averaged = self._averaged
        return {f"averaged:{arch}": (arch, weights) for arch, weights in averaged.items()} if averaged_round == state.round else {}

    # -- reverse distillation: the small models teach the large one -------------------------------
    def round_teacher(self, updates: Sequence[ClientUpdate], groups: dict[str, GroupAggregate], metrics: RoundMetrics) -> TargetFunction:
        """The round's fused teacher: per architecture, the logits of its averaged model or the mean
        logits of its clients' models (`teacher_kind`), softened; then fused across architectures.
        Its models are built once and held for the round."""
        if self.teacher_kind == "ensemble":
            states = {arch: [u.state for u in updates if u.architecture == arch] for arch in groups}
        else:
            states = {arch: [group.state] for arch, group in groups.items()}
        members = {arch: [instantiate(arch, self.spec, weights, self.device) for weights in weights_list]
                   for arch, weights_list in states.items()}
        # the fusion's weights, made once: a copy to a GPU on every augmented batch would wait for it
        sample_counts = torch.tensor([g.num_examples for g in groups.values()], device=self.device)

        def teacher(images: torch.Tensor) -> torch.Tensor:
            probs = []
            for arch, models in members.items():
                logits = torch.zeros(())
                for model in models:
                    logits = logits + predict_logits(model, images)
                    metrics.add_work(arch, "inference", len(images))
                probs.append(self.kd.soft_targets(logits / len(models)))
            return self.fuse(torch.stack(probs), sample_counts)

        return teacher

    def teacher_targets(self, updates: Sequence[ClientUpdate], groups: dict[str, GroupAggregate], metrics: RoundMetrics) -> torch.Tensor:
        """The round's fused teacher's soft targets on the proxy set."""
        return self.round_teacher(updates, groups, metrics)(self.server_data.proxy_images)

    def _reverse_distill(
        self, state: ServerState, updates: Sequence[ClientUpdate], groups: dict[str, GroupAggregate], round_number: int,
        metrics: RoundMetrics,
    ) -> tuple[torch.nn.Module, StateDict]:
        """The large model after this round's reverse distillation, and its final momentum buffers."""
        assert state.large is not None
        distill = self.config.distill
        teacher = self.round_teacher(updates, groups, metrics)
        anchoring = distill.reverse_selection != "none" or distill.reverse_self_weight > 0
        if anchoring:
            teacher, kept_share = self._anchored(teacher, state.large, metrics)
        (proxy, labels), _ = self.distillation_images(round_number)
        targets = distillation_targets(teacher, proxy, distill.reverse)
        student = instantiate(self.config.models.large, self.spec, state.large, self.device)
        kd_weight = 1.0
        if distill.reverse_kd_scaling == "teacher-quality":
            kd_weight = self._teacher_quality(targets, student, metrics)
            metrics.values["reverse-kd-weight"] = kd_weight
        outcome = train_distill(
            student, proxy, targets, self.kd, distill.reverse, derive_seed(self.config.seed, "reverse-distill", round_number),
            labels=labels, ce_weight=distill.reverse_ce_weight, momentum=state.optimizers.get(REVERSE),
            kd_weight=kd_weight,
        )
        if anchoring and distill.reverse_selection != "none":
            metrics.values["reverse-teacher-kept"] = kept_share()
        metrics.values["reverse-loss"] = outcome.loss
        metrics.add_work(self.config.models.large, "train", outcome.samples)
        metrics.add_work(self.config.models.large, "inference", outcome.held_out_passes)
        return student, outcome.momentum

    def _guard_keeps(self, distilled: torch.nn.Module, previous: torch.nn.Module, metrics: RoundMetrics) -> bool:
        """Whether the round's reverse distillation is kept: the `distilled` large model's accuracy on the
        guard images (`distill.reverse-guard-size`) is no more than `distill.reverse-guard-tolerance` under
        the `previous` one's, from before the round."""
        guard = self.server_data.guard
        assert guard is not None
        accuracy_before, accuracy_after = evaluate(previous, guard)["accuracy"], evaluate(distilled, guard)["accuracy"]
        metrics.add_work(self.config.models.large, "inference", 2 * len(guard))
        kept = guard_keeps(accuracy_before, accuracy_after, len(guard), self.config.distill.reverse_guard_tolerance)
        metrics.values["reverse-guard"] = {"before": accuracy_before, "after": accuracy_after, "kept": kept}
        return kept

    def _anchored(
        self, teacher: TargetFunction, large: StateDict, metrics: RoundMetrics
    ) -> tuple[TargetFunction, Callable[[], float]]:
        """`teacher` anchored to the large model as it was before the round (`anchored_targets`:
        confidence selection and self-distillation, no labels), and a function giving the share of
        the images it was asked about on which the teachers' targets were kept."""
        distill = self.config.distill
        own = self._large_teacher(instantiate(self.config.models.large, self.spec, large, self.device), metrics)
        kept = {"count": torch.zeros((), device=self.device), "seen": 0}

        def anchored(images: torch.Tensor) -> torch.Tensor:
            teacher_probs, own_probs = teacher(images), own(images)
            if distill.reverse_selection == "confidence":  # counted on the device: no host read a batch
                kept["count"] = kept["count"] + (teacher_probs.max(-1).values >= own_probs.max(-1).values).sum()
                kept["seen"] += len(images)
            return anchored_targets(teacher_probs, own_probs, distill.reverse_selection, distill.reverse_self_weight)

        return anchored, lambda: float(kept["count"] / max(kept["seen"], 1))

    def _teacher_quality(self, targets: Targets, student: torch.nn.Module, metrics: RoundMetrics) -> float:
        """`teacher_quality_weight` of the fused teacher against the large model, on the labelled
        server set (the head of the proxy set)."""
        labelled = self.server_data.labelled
        assert labelled is not None  # the config validator guarantees a labelled server set
        on_labelled = targets(labelled.images) if callable(targets) else targets[: len(labelled)]
        teacher_accuracy = float((on_labelled.argmax(1) == labelled.labels).float().mean())
        student_accuracy = evaluate(student, labelled)["accuracy"]
        metrics.add_work(self.config.models.large, "inference", len(labelled))
        return teacher_quality_weight(teacher_accuracy, student_accuracy)

    def distillation_images(self, round_number: int) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """Round `round_number`'s reverse-distillation images with their labels (`proxy_labels`), and
        its forward-distillation images (round 0: the initial one): the proxy set, or the parts
        `distill.proxy-split` gives each."""
        proxy, labels = self.server_data.proxy_images, self.proxy_labels()
        sets = self._split_by_parity[round_number % 2]
        if sets is None:
            return (proxy, labels), proxy
        reverse, forward = (indices.to(proxy.device) for indices in sets)
        return (proxy[reverse], None if labels is None else labels[reverse]), proxy[forward]

    def proxy_labels(self) -> torch.Tensor | None:
        """One label per proxy image, -1 where the server has none (the labelled set is the first
        `data.proxy-labelled` proxy images); None without a labelled set."""
        labelled, proxy = self.server_data.labelled, self.server_data.proxy_images
        if labelled is None:
            return None
        labels = torch.full((len(proxy),), -1, dtype=torch.long, device=proxy.device)
        labels[: len(labelled)] = labelled.labels
        return labels

    # -- forward distillation: the large model teaches the small ones -----------------------------
    def _large_teacher(self, large_model: torch.nn.Module, metrics: RoundMetrics) -> TargetFunction:
        """The large model as a teacher: its softened outputs on any images."""

        def teacher(images: torch.Tensor) -> torch.Tensor:
            metrics.add_work(self.config.models.large, "inference", len(images))
            return self.kd.soft_targets(predict_logits(large_model, images))

        return teacher

    def _forward_distill(
        self, arch: str, weights: StateDict, images: torch.Tensor, targets: Targets, state: ServerState, round_number: int,
        metrics: RoundMetrics,
    ) -> tuple[StateDict, StateDict]:
        """The small model `arch` clients receive next round, and its distillation's final momentum:
        the large model's `targets` on `images` distilled into `weights` (the round's average), mixed
        back with them by `distill.forward-mix`."""
        distilled, momentum = self._distil_small(arch, weights, images, targets, self.config.distill.forward, round_number,
                                                 metrics, state.optimizers.get(f"forward:{arch}"))
        mix = self.config.distill.forward_mix
        return (distilled if mix == 1 else fedavg([distilled, weights], [mix, 1 - mix])), momentum

    def _distil_small(
        self, arch: str, weights: StateDict, images: torch.Tensor, targets: Targets, settings: DistillOptimizerConfig,
        round_number: int, metrics: RoundMetrics, momentum: StateDict | None,
    ) -> tuple[StateDict, StateDict]:
        """`weights` of `arch` after distilling the large model's `targets` on the proxy `images` into
        them, and the distillation's final momentum buffers."""
        student = instantiate(arch, self.spec, weights, self.device)
        outcome = train_distill(
            student, images, targets, self.kd, settings,
            derive_seed(self.config.seed, "forward-distill", round_number, arch), momentum=momentum,
        )
        metrics.values[f"forward-loss:{arch}"] = outcome.loss
        metrics.add_work(arch, "train", outcome.samples)
        metrics.add_work(arch, "inference", outcome.held_out_passes)
        return module_state(student), outcome.momentum

class FedDF(Koala):
    """FedDF (Lin et al., 2020) in KOALA's setting: the mean logits of the round's client models are
    distilled into the large model; the small models are only averaged (no forward distillation)."""

    name = "feddf"

    @property
    def teacher_kind(self) -> str:
        return "ensemble"

    def forward_distills(self, round_number: int) -> bool:
        return False
