"""Distillation loss and teacher fusion against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from koala.distill import (
    fuse_by_confidence,
    fuse_by_consensus,
    fuse_by_sample_share,
    fuse_uniform,
    fusion_names,
    fusion_rule,
    kd_loss,
    labelled_cross_entropy,
    soft_targets,
    teacher_quality_weight,
)
from koala.errors import ConfigError


def test_kd_loss_is_zero_when_teacher_equals_student() -> None:
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    assert kd_loss(logits, soft_targets(logits, 3.0), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_known_value() -> None:
    # T = 2: student logits [0, 0] -> uniform; teacher probs [0.75, 0.25].
    # KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5); loss = T² · KL.
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[0.75, 0.25]])
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_averages_over_the_batch() -> None:
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    single = kd_loss(student[:1], teacher[:1], 1.0).item()
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(single / 2, rel=1e-6)


def test_soft_targets_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0]])
    hot, warm = soft_targets(logits, 1.0), soft_targets(logits, 4.0)
    assert hot[0, 0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    assert warm[0, 0].item() == pytest.approx(1 / (1 + math.exp(-0.5)))


def test_sample_share_fusion_weights_by_group_size() -> None:
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two teachers, one sample, two classes
    fused = fuse_by_sample_share(probs, torch.tensor([300, 100]))
    assert torch.allclose(fused, torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(fuse_uniform(probs, torch.tensor([300, 100])), torch.tensor([[0.5, 0.5]]))


def test_confidence_fusion_weights_each_example_by_share_times_top_probability() -> None:
    # Example 1: teacher A (share 0.5) is sure [0.9, 0.1], B (share 0.5) unsure [0.4, 0.6]:
    # weights 0.5*0.9 = 0.45 and 0.5*0.6 = 0.3 -> (0.45*0.9 + 0.3*0.4) / 0.75 = 0.7 for class 0.
    # Example 2: both equally sure -> plain share-weighted mean.
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2]], [[0.4, 0.6], [0.2, 0.8]]])
    fused = fuse_by_confidence(probs, torch.tensor([50, 50]))
    assert torch.allclose(fused, torch.tensor([[0.7, 0.3], [0.5, 0.5]]))


def test_consensus_fusion_drops_teachers_that_disagree() -> None:
    # Example 1: A and B (shares 0.25 each) say class 0, C (share 0.5) says class 1 weakly;
    # the share-weighted consensus is class 0 (0.25*0.9 + 0.25*0.7 + 0.5*0.4 = 0.6), so C is dropped
    # and A, B are averaged: [0.8, 0.2].
    probs = torch.tensor([
        [[0.9, 0.1], [0.55, 0.45]],
        [[0.7, 0.3], [0.55, 0.45]],
        [[0.4, 0.6], [0.35, 0.65]],
    ])
    fused = fuse_by_consensus(probs, torch.tensor([25, 25, 50]))
    assert torch.allclose(fused[0], torch.tensor([0.8, 0.2]))
    # example 2: consensus = 0.25*0.55 + 0.25*0.55 + 0.5*0.35 = 0.45 for class 0 -> class 1; only C agrees
    assert torch.allclose(fused[1], torch.tensor([0.35, 0.65]))


def test_consensus_fusion_keeps_everyone_when_nobody_agrees() -> None:
    # A says 0, B says 2, their mean says 1: no teacher agrees, so all are kept.
    probs = torch.tensor([[[0.5, 0.45, 0.05]], [[0.05, 0.45, 0.5]]])
    fused = fuse_by_consensus(probs, torch.tensor([1, 1]))
    assert torch.allclose(fused, torch.tensor([[0.275, 0.45, 0.275]]))


def _fusion_by_hand(name: str, probs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each rule written out example by example, teacher by teacher, in plain Python."""
    shares = [c / sum(counts) for c in counts]
    fused = []
    for n in range(probs.shape[1]):
        if name == "uniform":
            weights = [1.0] * len(counts)
        elif name == "sample-share":
            weights = shares
        elif name == "confidence":
            weights = [shares[k] * float(probs[k, n].max()) for k in range(len(counts))]
        else:  # consensus: the teachers whose top class is that of the sample-share mixture
            mixture = sum(shares[k] * probs[k, n] for k in range(len(counts)))
            agree = [int(probs[k, n].argmax()) == int(mixture.argmax()) for k in range(len(counts))]
            weights = [shares[k] * (agree[k] or not any(agree)) for k in range(len(counts))]
        fused.append(sum(w * probs[k, n] for k, w in enumerate(weights)) / sum(weights))
    return torch.stack(fused)


@pytest.mark.parametrize("name", ["sample-share", "uniform", "confidence", "consensus"])
def test_fused_targets_equal_the_rule_written_out_by_hand(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(3, 50, 10, generator=g), dim=-1)
    fused = fusion_rule(name)(probs, torch.tensor([1, 2, 7]))
    torch.testing.assert_close(fused, _fusion_by_hand(name, probs, [1, 2, 7]), rtol=1e-5, atol=1e-6)
    assert torch.allclose(fused.sum(-1), torch.ones(50))


def test_fusion_registry() -> None:
    assert fusion_names() == ["confidence", "consensus", "sample-share", "uniform"]
    assert fusion_rule("uniform") is fuse_uniform
    with pytest.raises(ConfigError, match="unknown fusion rule 'vote'; known rules: confidence, consensus, sample-share"):
        fusion_rule("vote")


def test_labelled_cross_entropy_averages_over_the_labelled_examples_only() -> None:
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, -1, 0, -1])
    expected = (F.cross_entropy(logits[0:1], labels[0:1]) + F.cross_entropy(logits[2:3], labels[2:3])) / 2
    assert labelled_cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert labelled_cross_entropy(logits, torch.full((4,), -1)).item() == 0.0  # no label known: no term


def test_teacher_quality_weight() -> None:
    assert teacher_quality_weight(0.4, 0.8) == pytest.approx(0.5)
    assert teacher_quality_weight(0.9, 0.6) == 1.0  # a better teacher gets the full weight
    assert teacher_quality_weight(0.3, 0.0) == 1.0
