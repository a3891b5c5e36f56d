"""Distillation loss and teacher fusion against hand-computed values."""

import math

import pytest
import torch

from koala.distill import fuse_by_sample_share, fuse_uniform, fusion_names, fusion_rule, kd_loss, soft_targets
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


def test_fused_targets_stay_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, 5, 10, generator=g), dim=-1)
    fused = fuse_by_sample_share(probs, torch.tensor([1, 2, 7]))
    assert torch.allclose(fused.sum(-1), torch.ones(5))


def test_fusion_registry() -> None:
    assert {"sample-share", "uniform"} <= set(fusion_names())
    assert fusion_rule("uniform") is fuse_uniform
    with pytest.raises(ConfigError, match="unknown fusion rule 'vote'; known rules: sample-share"):
        fusion_rule("vote")
