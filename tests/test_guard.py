"""Keeping the large model's better self (`distill.reverse-guard-size`): labelled server images held
out of pretraining and cross-entropy decide whether a round's reverse distillation is kept."""

import json
from pathlib import Path

import pytest
import torch
from helpers import BASE, DIGITS_KOALA

from koala.algorithms.koala import guard_keeps
from koala.config import config_to_toml, load_config
from koala.errors import ConfigError
from koala.run.checkpoint import load_checkpoint
from koala.run.experiment import prepare_experiment
from koala.run.launch import run_local
from koala.run.run_dir import SUMMARY_FILE, read_metrics

# a large model pretrained on the labelled proxy images, then rounds of pure KD whose first
# teachers are untrained small models: round 1 pulls the large model far down (tests/test_anchors.py)
PRETRAINED = [*DIGITS_KOALA, "rounds=2", "client.epochs=1", "distill.temperature=3.0", "data.proxy-labelled=300",
              "large-init.kind='pretrain'", "large-init.pretrain.epochs=20", "distill.reverse.epochs=3"]
GUARD = "distill.reverse-guard-size=100"


def test_the_guard_images_are_the_labelled_sets_tail_and_leave_pretraining_and_cross_entropy() -> None:
    config = load_config(BASE, [*PRETRAINED, GUARD, "distill.reverse-ce-weight=1.0"])
    experiment = prepare_experiment(config)
    server, split = experiment.algorithm.server_data, experiment.split
    assert (len(server.labelled), len(server.guard)) == (200, 100)
    torch.testing.assert_close(server.labelled.images, split.proxy_images[:200])
    torch.testing.assert_close(server.guard.images, split.proxy_images[200:300])
    torch.testing.assert_close(server.guard.labels, split.labelled_server.labels[200:])
    labels = experiment.algorithm.proxy_labels()
    assert (labels[:200] >= 0).all() and (labels[200:] == -1).all()  # no cross-entropy on the guard
    # off, the labelled set is whole and there is no guard
    plain = prepare_experiment(load_config(BASE, PRETRAINED)).algorithm.server_data
    assert (len(plain.labelled), plain.guard) == (300, None)


def _run(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    run_local(load_config(BASE, [*PRETRAINED, *extra]), tmp_path / name, echo=lambda _: None)
    return read_metrics(tmp_path / name)


def test_a_distillation_that_lowers_the_guards_accuracy_is_undone(tmp_path: Path) -> None:
    unguarded = _run(tmp_path, "unguarded", "data.proxy-labelled=200")  # pretrained on the same 200 images
    guarded = _run(tmp_path, "guarded", GUARD)
    start = guarded[0]["eval"]["large"]["accuracy"]
    assert unguarded[0]["eval"]["large"]["accuracy"] == start
    assert unguarded[1]["eval"]["large"]["accuracy"] < start - 0.3  # unguarded, round 1 wipes out the start
    verdict = guarded[1]["reverse-guard"]
    assert not verdict["kept"] and verdict["after"] < verdict["before"]
    assert guarded[1]["eval"]["large"] == guarded[0]["eval"]["large"]  # the start, exactly
    # the summary names the undone rounds, the description the guard's size
    summary = json.loads((tmp_path / "guarded" / SUMMARY_FILE).read_text())
    assert 1 in summary["reverse-guard-undone"] and summary["split"]["labelled-guard"] == 100
    assert "reverse-guard-undone" not in json.loads((tmp_path / "unguarded" / SUMMARY_FILE).read_text())
    for line in guarded[1:]:
        assert line["reverse-guard"]["kept"] == (line["reverse-guard"]["after"] >= line["reverse-guard"]["before"])
    # the guard's check is two inference passes of the large model over its 100 images
    assert guarded[1]["resources"]["server-flops"] > unguarded[1]["resources"]["server-flops"]


@pytest.mark.parametrize(("size", "before", "after", "tolerance", "kept"), [
    (200, 170, 170, 0.0, True), (200, 170, 169, 0.0, False), (200, 170, 171, 0.0, True),  # no tolerance: no fall
    (200, 170, 166, 0.02, True), (200, 170, 165, 0.02, False),  # 2 points of 200 images: 4 images, not 5
    (200, 170, 168, 0.0125, True), (200, 170, 167, 0.0125, False),  # 2.5 images: a fall of 2, not of 3
    (230, 200, 196, 0.02, True), (230, 200, 195, 0.02, False),  # 4.6 images: 4, not 5
    (7, 5, 4, 1 / 7, True), (7, 5, 3, 1 / 7, False),  # exactly one image, whatever the float error
])
def test_the_tolerance_counts_whole_guard_images(size: int, before: int, after: int, tolerance: float, kept: bool) -> None:
    # accuracies as evaluation gives them: a float32 mean over the guard
    accuracy = [torch.tensor([1.0] * n + [0.0] * (size - n)).mean().item() for n in (before, after)]
    assert guard_keeps(*accuracy, size, tolerance) is kept


def test_a_tolerance_keeps_a_fall_within_it_and_undoes_a_larger_one(tmp_path: Path) -> None:
    strict = _run(tmp_path, "strict", GUARD)[1]["reverse-guard"]  # round 1's distillation wipes out the start
    fall = strict["before"] - strict["after"]
    assert fall > 0.1 and not strict["kept"]
    # a tolerance just over the fall keeps the round: the large model is the one an unguarded run distils
    wide = _run(tmp_path, "wide", GUARD, f"distill.reverse-guard-tolerance={fall + 0.01:.4f}")
    unguarded = _run(tmp_path, "unguarded", "data.proxy-labelled=200")
    assert wide[1]["reverse-guard"] == {**strict, "kept": True}
    assert wide[1]["eval"]["large"] == unguarded[1]["eval"]["large"] != wide[0]["eval"]["large"]
    # and one just under it undoes the round, as no tolerance does
    narrow = _run(tmp_path, "narrow", GUARD, f"distill.reverse-guard-tolerance={fall - 0.01:.4f}")
    assert narrow[1]["reverse-guard"] == strict and narrow[1]["eval"]["large"] == narrow[0]["eval"]["large"]


def test_an_undone_round_leaves_the_reverse_momentum_as_it_was(tmp_path: Path) -> None:
    # round 1 has no reverse momentum before it: undone, it has none after (the forward ones are the round's)
    momenta = {}
    for name, extra in (("kept", []), ("undone", [GUARD])):
        config = load_config(BASE, [*PRETRAINED, *extra, "rounds=1", "distill.keep-optimizer-state=true"])
        run_local(config, tmp_path / name, echo=lambda _: None)
        momenta[name] = load_checkpoint(tmp_path / name, config_to_toml(config), torch.device("cpu")).state.optimizers
    assert set(momenta["kept"]) == {"reverse", "forward:lenet"}
    assert set(momenta["undone"]) == {"forward:lenet"}
    assert read_metrics(tmp_path / "undone")[1]["reverse-guard"]["kept"] is False


def test_a_distillation_that_helps_is_kept(tmp_path: Path) -> None:
    # teachers that carry the start (initial forward distillation) and cross-entropy beside KD
    lines = _run(tmp_path, "helped", GUARD, "distill.initial-forward-epochs=10", "distill.forward.lr=0.05",
                 "distill.reverse-ce-weight=1.0")
    kept = [line for line in lines[1:] if line["reverse-guard"]["kept"]]
    assert kept
    for line in kept:
        previous = lines[line["round"] - 1]["eval"]["large"]
        assert line["eval"]["large"] != previous  # the distilled model is the one evaluated


@pytest.mark.parametrize(("overrides", "expected"), [
    (["distill.reverse-guard-size=400"], "distill.reverse-guard-size = 400"),
    (["distill.reverse-guard-size=300"], "leave some for pretraining"),  # the pretraining needs labelled images
    (["distill.reverse-guard-size=100", "algorithm='fedavg-large'"], "which algorithm = 'fedavg-large' does not do"),
])
def test_a_guard_larger_than_the_labelled_set_is_refused_by_name(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(BASE, [*PRETRAINED, *overrides])
