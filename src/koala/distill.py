"""Distillation losses and the fusion of several teachers into one consensus target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from koala.errors import ConfigError


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-softened class probabilities."""
    return F.softmax(logits / temperature, dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(teacher ‖ student) on temperature-softened outputs, averaged over the batch.

    The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_student, teacher_probs, reduction="batchmean")


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation at one temperature T, bound here once: it softens the teacher's
    logits into targets and the student's logits in the loss, which must use the same T."""

    temperature: float

    def soft_targets(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's temperature-softened class probabilities."""
        return soft_targets(teacher_logits, self.temperature)

    def loss(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """T²·KL(teacher ‖ student), averaged over the batch (`kd_loss`)."""
        return kd_loss(student_logits, teacher_probs, self.temperature)


def labelled_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the examples whose label is known (`labels` >= 0; -1 marks an
    unlabelled one), 0 when none is; computed without a host sync."""
    known = labels >= 0
    ce = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
    return (ce * known).sum() / known.sum().clamp(min=1)


def anchored_targets(
    teacher_probs: torch.Tensor, own_probs: torch.Tensor, selection: str, self_weight: float
) -> torch.Tensor:
    """Reverse targets that keep the large model's own knowledge where its teachers add none,
    without labels. `own_probs` are the large model's softened predictions from before the round.

    selection "confidence": per example, the teachers' target where their top probability is at
    least the large model's, else the large model's own (FedGEMS-style selective fusion with
    confidence in place of labels). Then `self_weight` of the large model's own prediction is mixed
    in (self-distillation). With "none" and 0, the teachers' targets are returned unchanged.
    """
    targets = teacher_probs
    if selection == "confidence":
        kept = teacher_probs.max(dim=-1).values >= own_probs.max(dim=-1).values
        targets = torch.where(kept[:, None], teacher_probs, own_probs)
    if self_weight:
        targets = (1 - self_weight) * targets + self_weight * own_probs
    return targets


def teacher_quality_weight(teacher_accuracy: float, student_accuracy: float) -> float:
    """The reverse-KD weight that protects a better student from a weaker teacher: the teacher's
    accuracy over the student's (both on the labelled server set), at most 1."""
    return min(1.0, teacher_accuracy / max(student_accuracy, 1e-12))


FusionRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(teacher_probs (K, N, C), sample_counts (K,)) -> fused probabilities (N, C)."""

_FUSION_RULES: dict[str, FusionRule] = {}


def register_fusion(name: str) -> Callable[[FusionRule], FusionRule]:
    """Decorator: make a fusion rule selectable by `distill.fusion = name`."""

    def decorator(rule: FusionRule) -> FusionRule:
        _FUSION_RULES[name] = rule
        return rule

    return decorator


def fusion_names() -> list[str]:
    return sorted(_FUSION_RULES)


def fusion_rule(name: str) -> FusionRule:
    """The fusion rule registered as `name`; an unknown name lists the known ones."""
    try:
        return _FUSION_RULES[name]
    except KeyError:
        raise ConfigError(
            f"distill.fusion: unknown fusion rule {name!r}; known rules: {', '.join(fusion_names())}"
        ) from None


@register_fusion("sample-share")
def fuse_by_sample_share(teacher_probs: torch.Tensor, sample_counts: torch.Tensor) -> torch.Tensor:
    """Each teacher weighted by its group's share of the round's training samples."""
    weights = sample_counts.to(teacher_probs.dtype) / sample_counts.sum()
    return torch.einsum("k,knc->nc", weights, teacher_probs)


@register_fusion("uniform")
def fuse_uniform(teacher_probs: torch.Tensor, sample_counts: torch.Tensor) -> torch.Tensor:
    """Every teacher counts the same, whatever its group's size."""
    return teacher_probs.mean(dim=0)


@register_fusion("confidence")
def fuse_by_confidence(teacher_probs: torch.Tensor, sample_counts: torch.Tensor) -> torch.Tensor:
    """Per example, each teacher weighted by its group's sample share times its confidence (its
    top probability), so a teacher that is unsure of an example counts less on it."""
    shares = sample_counts.to(teacher_probs.dtype) / sample_counts.sum()
    weights = shares[:, None] * teacher_probs.max(dim=-1).values  # (K, N)
    return torch.einsum("kn,knc->nc", weights / weights.sum(dim=0), teacher_probs)


@register_fusion("consensus")
def fuse_by_consensus(teacher_probs: torch.Tensor, sample_counts: torch.Tensor) -> torch.Tensor:
    """Per example, the sample-share fusion of only the teachers whose top class is the consensus
    (the top class of the sample-share fusion of all); where none agrees, all of them."""
    shares = sample_counts.to(teacher_probs.dtype) / sample_counts.sum()
    consensus = torch.einsum("k,knc->nc", shares, teacher_probs).argmax(dim=-1)  # (N,)
    agrees = teacher_probs.argmax(dim=-1) == consensus  # (K, N)
    agrees |= ~agrees.any(dim=0)  # nobody agrees: keep everyone
    weights = shares[:, None] * agrees.to(teacher_probs.dtype)
    return torch.einsum("kn,knc->nc", weights / weights.sum(dim=0), teacher_probs)
