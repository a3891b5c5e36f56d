"""Label-free anchors of the large model: confidence-selected and self-distilled reverse targets,
and the initial forward distillation of a pretrained start into the small models."""

from pathlib import Path

import pytest
import torch
from helpers import BASE, DIGITS_KOALA

from koala.config import load_config
from koala.distill import anchored_targets
from koala.errors import ConfigError
from koala.run.launch import run_local

# a large model pretrained on 300 labelled proxy images, then two rounds of pure KD (no labels) whose
# first teachers are untrained small models: the setting in which the paper's round wipes out the start
PRETRAINED = [*DIGITS_KOALA, "rounds=2", "client.epochs=1", "distill.temperature=3.0", "data.proxy-labelled=300",
              "large-init.kind='pretrain'", "large-init.pretrain.epochs=20", "distill.reverse.epochs=3"]


def test_confidence_selection_keeps_the_teacher_only_where_it_is_at_least_as_confident() -> None:
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [0.5, 0.5, 0.0]])
    own = torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.8, 0.1], [0.0, 0.5, 0.5]])
    selected = anchored_targets(teacher, own, "confidence", 0.0)
    torch.testing.assert_close(selected, torch.stack([teacher[0], own[1], teacher[2]]))  # ties keep the teacher


def test_self_weight_mixes_the_large_models_own_prediction_into_the_target() -> None:
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3]])
    own = torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.8, 0.1]])
    mixed = anchored_targets(teacher, own, "none", 0.25)
    torch.testing.assert_close(mixed, torch.tensor([[0.55, 0.3, 0.15], [0.325, 0.425, 0.25]]))
    torch.testing.assert_close(mixed.sum(-1), torch.ones(2))
    # both: the selection first, then the mix
    both = anchored_targets(teacher, own, "confidence", 0.5)
    torch.testing.assert_close(both, torch.stack([0.5 * teacher[0] + 0.5 * own[0], own[1]]))


def test_anchors_off_return_the_teachers_targets_untouched() -> None:
    teacher, own = torch.rand(4, 3), torch.rand(4, 3)
    assert anchored_targets(teacher, own, "none", 0.0) is teacher


def _large_accuracy(tmp_path: Path, name: str, *extra: str) -> tuple[list[float], list[dict]]:
    metrics = run_local(load_config(BASE, [*PRETRAINED, *extra]), tmp_path / name, echo=lambda _: None).metrics
    return [line["eval"]["large"]["accuracy"] for line in metrics], metrics


def test_label_free_anchors_keep_a_pretrained_start_that_pure_kd_wipes_out(tmp_path: Path) -> None:
    plain, _ = _large_accuracy(tmp_path, "plain")
    start = plain[0]
    assert start > 0.7 and plain[1] < start - 0.3  # untrained teachers: pure KD collapses round 1
    selected, metrics = _large_accuracy(tmp_path, "selected", "distill.reverse-selection='confidence'")
    assert selected[1] > start - 0.1 and selected[1] > plain[1] + 0.3
    assert metrics[1]["reverse-teacher-kept"] < 0.3  # untrained teachers are rarely the more confident
    assert "reverse-teacher-kept" not in _large_accuracy(tmp_path, "self", "distill.reverse-self-weight=0.9")[1][1]
    mixed, _ = _large_accuracy(tmp_path, "self-mixed", "distill.reverse-self-weight=0.9")
    assert mixed[1] > plain[1] + 0.3
    # the own predictions are one more inference pass of the large model over the proxy set
    assert metrics[1]["resources"]["server-flops"] > _large_metrics_flops(tmp_path)


def _large_metrics_flops(tmp_path: Path) -> int:
    from koala.run.run_dir import read_metrics

    return read_metrics(tmp_path / "plain")[1]["resources"]["server-flops"]


def test_initial_forward_distillation_hands_the_clients_the_pretrained_knowledge(tmp_path: Path) -> None:
    plain, plain_metrics = _large_accuracy(tmp_path, "plain")
    warm, warm_metrics = _large_accuracy(tmp_path, "warm", "distill.initial-forward-epochs=10", "distill.forward.lr=0.05")
    assert warm[0] == plain[0]  # the same pretrained start
    small_plain = plain_metrics[0]["eval"]["small:lenet"]["accuracy"]
    small_warm = warm_metrics[0]["eval"]["small:lenet"]["accuracy"]
    assert small_plain < 0.25 and small_warm > 0.6  # a random LeNet against one taught by the start
    assert "forward-loss:lenet" in warm_metrics[0] and "forward-loss:lenet" not in plain_metrics[0]
    assert warm_metrics[0]["resources"]["server-flops"] > plain_metrics[0]["resources"]["server-flops"]
    # round 1's teachers start from that LeNet, so pure KD no longer wipes out the large model
    assert warm[1] > plain[1] + 0.3


def test_levers_without_what_they_need_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="distill.initial-forward-epochs > 0 .* large-init.kind = 'random'"):
        load_config(BASE, ["distill.initial-forward-epochs=5"])
    with pytest.raises(ConfigError, match="distill.reverse-self-weight"):
        load_config(BASE, ["distill.reverse-self-weight=1.0"])
    with pytest.raises(ConfigError, match="distill.reverse-selection"):
        load_config(BASE, ["distill.reverse-selection='labels'"])
