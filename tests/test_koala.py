"""The KOALA round on the server: its teachers (each architecture's averaged model or its clients'
ensemble), the labelled server set and teacher-quality scaling that keep a pretrained start, the
forward mix, the server momentum carried across rounds, and the proxy images each distillation uses."""

from pathlib import Path

import pytest
import torch
from helpers import BASE, DIGITS_KOALA, round_one_updates

from koala.aggregate import aggregate_by_architecture
from koala.algorithms import RoundMetrics
from koala.algorithms.koala import distillation_sets
from koala.config import load_config
from koala.distill import soft_targets
from koala.errors import ConfigError
from koala.run.experiment import Experiment, prepare_experiment
from koala.run.launch import run_local
from koala.state import ClientUpdate, StateDict
from koala.training import predict_logits, samples_per_epoch
from koala.weights import evaluate_state, instantiate

DIGITS = [*DIGITS_KOALA, "rounds=3", "client.epochs=3", "distill.temperature=1.0", "distill.reverse.epochs=5"]


def _experiment(*overrides: str) -> Experiment:
    return prepare_experiment(load_config(BASE, [*DIGITS, *overrides]))


def _accuracy(metrics: list[dict], model: str) -> list[float]:
    return [line["eval"][model]["accuracy"] for line in metrics if "eval" in line]


def _logits(experiment: Experiment, arch: str, weights) -> torch.Tensor:
    return predict_logits(instantiate(arch, experiment.spec, weights, "cpu"), experiment.split.proxy_images)


@pytest.mark.parametrize("teacher", ["averaged", "ensemble"])
def test_teacher_targets_match_a_hand_computation(teacher: str) -> None:
    experiment = _experiment("models.small=['lenet','mobilenetv3-small']", f"distill.teacher='{teacher}'",
                             "distill.fusion='uniform'")
    updates = round_one_updates(experiment)
    groups = aggregate_by_architecture(updates)
    metrics = RoundMetrics()
    targets = experiment.algorithm.teacher_targets(updates, groups, metrics)

    expected = []
    for arch, group in groups.items():
        if teacher == "averaged":
            logits = _logits(experiment, arch, group.state)
        else:
            logits = torch.stack([_logits(experiment, arch, u.state) for u in updates if u.architecture == arch]).mean(0)
        expected.append(soft_targets(logits, experiment.config.distill.temperature))
    torch.testing.assert_close(targets, torch.stack(expected).mean(0), rtol=1e-5, atol=1e-6)
    proxy = len(experiment.split.proxy_images)
    passes = sum(metrics.work[(arch, "inference")] for arch in groups)
    assert passes == (len(updates) if teacher == "ensemble" else len(groups)) * proxy


def test_the_ensemble_teacher_differs_from_the_averaged_model() -> None:
    experiment = _experiment("models.small=['lenet']")
    updates = round_one_updates(experiment)
    groups = aggregate_by_architecture(updates)
    averaged = experiment.algorithm.teacher_targets(updates, groups, RoundMetrics())
    ensemble = _experiment("models.small=['lenet']", "distill.teacher='ensemble'").algorithm.teacher_targets(
        updates, groups, RoundMetrics())
    assert not torch.allclose(averaged, ensemble, atol=1e-4)


def test_labels_on_the_proxy_set_or_teacher_quality_scaling_keep_a_pretrained_large_start(tmp_path: Path) -> None:
    # Untrained small teachers wipe out a pretrained large model in one round of pure KD; the
    # cross-entropy on the 300 labelled proxy images holds it (REFERENCES: 77.6 % -> 46.4 % without).
    base = [*DIGITS, "rounds=2", "client.epochs=1", "distill.temperature=3.0", "data.proxy-labelled=300",
            "large-init.kind='pretrain'", "large-init.pretrain.epochs=20", "distill.reverse.epochs=3"]
    experiment = _experiment(*base[len(DIGITS):])
    labelled, proxy = experiment.split.labelled_server, experiment.split.proxy_images
    assert torch.equal(labelled.images, proxy[:300])  # the labelled set is the head of the proxy set
    variants = {"plain": [], "ce": ["distill.reverse-ce-weight=1.0"], "scaled": ["distill.reverse-kd-scaling='teacher-quality'"]}
    runs = {name: run_local(load_config(BASE, [*base, *extra]), tmp_path / name, echo=lambda _: None).metrics
            for name, extra in variants.items()}
    start = runs["plain"][0]["eval"]["large"]["accuracy"]
    assert start > 0.7
    plain = _accuracy(runs["plain"], "large")[-1]
    assert plain < start - 0.3
    assert _accuracy(runs["ce"], "large")[-1] > plain + 0.4
    # teacher-quality scaling: the untrained teachers get a small weight, so round 1 hurts far less;
    # it only slows the collapse, since the weight grows as the large model degrades (RESULTS.md)
    assert runs["scaled"][1]["reverse-kd-weight"] < 0.5 and "reverse-kd-weight" not in runs["plain"][1]
    assert _accuracy(runs["scaled"], "large")[1] > _accuracy(runs["plain"], "large")[1] + 0.2


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_forward_mix_blends_the_distilled_and_the_averaged_small_model(mix: float) -> None:
    mixing = _experiment(f"distill.forward-mix={mix}")
    distilling = _experiment()
    state = distilling.algorithm.initial_state(RoundMetrics())
    updates = round_one_updates(distilling)
    averaged = aggregate_by_architecture(updates)["lenet"].state
    distilled = distilling.algorithm.server_round(state, updates, RoundMetrics()).small["lenet"]
    mixed = mixing.algorithm.server_round(state, updates, RoundMetrics()).small["lenet"]
    assert not torch.equal(distilled["features.0.weight"], averaged["features.0.weight"])
    for name, value in averaged.items():
        if value.is_floating_point():
            torch.testing.assert_close(mixed[name], mix * distilled[name] + (1 - mix) * value, rtol=1e-5, atol=1e-6)


def test_evaluation_reports_the_rounds_averaged_model_before_forward_distillation() -> None:
    """The large model's teacher (the averaged model) is evaluated, not only the forward-distilled
    small model the clients receive; the start, before any round averaged, has none."""
    experiment = _experiment()
    algorithm = experiment.algorithm
    state = algorithm.initial_state(RoundMetrics())
    assert set(algorithm.evaluate(state)) == {"large", "small:lenet"}
    updates = round_one_updates(experiment)
    averaged = aggregate_by_architecture(updates)["lenet"].state
    after = algorithm.server_round(state, updates, RoundMetrics())
    test = experiment.split.test
    results = algorithm.evaluate(after)
    assert results["averaged:lenet"] == evaluate_state("lenet", experiment.spec, averaged, test)
    assert results["small:lenet"] == evaluate_state("lenet", experiment.spec, after.small["lenet"], test)
    assert results["averaged:lenet"] != results["small:lenet"]  # forward distillation moved the small model
    other = experiment.split.client_pool  # another split: the averaged model is evaluated on the data asked for
    assert algorithm.evaluate(after, other)["averaged:lenet"] == evaluate_state("lenet", experiment.spec, averaged, other)
    assert "averaged:lenet" not in algorithm.evaluate(state)  # an earlier state: the round's averaged model is not its own
    plain = _experiment("distill.forward.epochs=0")  # the averaged model is what the clients receive: reported once
    after = plain.algorithm.server_round(plain.algorithm.initial_state(RoundMetrics()), updates, RoundMetrics())
    assert set(plain.algorithm.evaluate(after)) == {"large", "small:lenet"}


def test_koala_keeps_the_server_momentum_of_each_distillation_when_asked() -> None:
    for keep in (False, True):
        experiment = _experiment(f"distill.keep-optimizer-state={str(keep).lower()}")
        state = experiment.algorithm.initial_state(RoundMetrics())
        after = experiment.algorithm.server_round(state, round_one_updates(experiment), RoundMetrics())
        if keep:
            assert set(after.optimizers) == {"reverse", "forward:lenet"}
            assert after.optimizers["reverse"].keys() == {k for k in after.large if "running" not in k and "num_batches" not in k}
        else:
            assert after.optimizers == {}


def test_forward_distillation_can_stop_early_and_its_checks_are_counted() -> None:
    experiment = _experiment("models.small=['mobilenetv3-small']", "client.epochs=1", "distill.reverse.epochs=1", "distill.forward.epochs=4",
                             "distill.forward.holdout-fraction=0.25", "distill.forward.patience=1")
    state = experiment.algorithm.initial_state(RoundMetrics())
    metrics = RoundMetrics()
    experiment.algorithm.server_round(state, round_one_updates(experiment), metrics)
    proxy = len(experiment.split.proxy_images)
    held = round(0.25 * proxy)
    kept = proxy - held
    epochs_run = metrics.work[("mobilenetv3-small", "train")] // kept
    assert metrics.work[("mobilenetv3-small", "train")] == epochs_run * kept and 1 <= epochs_run <= 4
    # the averaged MobileNetV3 teaches the large model on the proxy set once; the forward student is
    # checked on the held-out slice at the start and after every epoch it ran
    assert metrics.work[("mobilenetv3-small", "inference")] == proxy + (epochs_run + 1) * held


def test_a_split_proxy_set_gives_each_distillation_its_own_images() -> None:
    assert distillation_sets("shared", 20, 4, 1) is None  # both distillations on every image: the path as before
    labelled, first, second = set(range(4)), set(range(4, 12)), set(range(12, 20))
    for round_number in range(4):
        reverse, forward = distillation_sets("disjoint", 20, 4, round_number)
        assert (set(reverse.tolist()), set(forward.tolist())) == (labelled | first, second)
        assert reverse[:4].tolist() == [0, 1, 2, 3]  # the labelled head stays the head: teacher-quality reads it there
    halves = [first, second]
    for round_number in range(4):  # round 0 is the initial forward distillation
        reverse, forward = distillation_sets("alternating", 20, 4, round_number)
        assert (set(reverse.tolist()), set(forward.tolist())) == (labelled | halves[round_number % 2], halves[round_number % 2])
        next_reverse, _ = distillation_sets("alternating", 20, 4, round_number + 1)
        assert not set(next_reverse.tolist()) & set(forward.tolist())  # the next teachers meet unseen images
    with pytest.raises(ConfigError, match="the proxy set holds 1 unlabelled image"):
        distillation_sets("disjoint", 5, 4, 1)


def _round_after_overwriting(split: str, proxy_indices: list[int], updates: list[ClientUpdate]) -> tuple[StateDict, StateDict]:
    """Round 1's large and small model when the proxy images at `proxy_indices` are replaced by noise;
    the round's training passes are checked against the sizes of its two image sets."""
    experiment = _experiment(f"distill.proxy-split='{split}'", "data.proxy-labelled=40", "distill.reverse-ce-weight=1.0")
    proxy = experiment.algorithm.server_data.proxy_images
    proxy[proxy_indices] = torch.rand(len(proxy_indices), *proxy.shape[1:], generator=torch.Generator().manual_seed(0))
    metrics = RoundMetrics()
    after = experiment.algorithm.server_round(experiment.algorithm.initial_state(RoundMetrics()), updates, metrics)
    reverse, forward = distillation_sets(split, len(proxy), 40, 1) or (proxy, proxy)
    distill = experiment.config.distill
    passes = [settings.epochs * samples_per_epoch(len(images), settings.batch_size)
              for images, settings in ((reverse, distill.reverse), (forward, distill.forward))]
    assert metrics.work[("lenet", "train")] == sum(passes)  # the large model is a LeNet too: one count for both
    return after.large, after.small["lenet"]


@pytest.mark.parametrize("split", ["disjoint", "alternating"])
def test_each_distillation_of_a_split_round_learns_only_from_its_own_images(split: str) -> None:
    """Replacing the proxy images round 1's reverse distillation does not use leaves its large model as
    it was (and its small one too, unless forward distillation uses them: "disjoint"); replacing the
    unlabelled images it uses moves the large model; with a shared proxy set every image moves it."""
    updates = round_one_updates(_experiment())
    size = len(_experiment().split.proxy_images)
    reverse, forward = (set(indices.tolist()) for indices in distillation_sets(split, size, 40, 1))
    not_reverse = sorted(set(range(size)) - reverse)
    large, small = _round_after_overwriting(split, [], updates)
    large_other_changed, small_other_changed = _round_after_overwriting(split, not_reverse, updates)
    large_reverse_changed, _ = _round_after_overwriting(split, sorted(reverse - set(range(40))), updates)
    assert all(torch.equal(large[name], large_other_changed[name]) for name in large)
    forward_moved = not torch.equal(small["features.0.weight"], small_other_changed["features.0.weight"])
    assert forward_moved == (split == "disjoint") == bool(forward & set(not_reverse))
    assert not torch.equal(large["features.0.weight"], large_reverse_changed["features.0.weight"])
    shared_large, _ = _round_after_overwriting("shared", [], updates)
    shared_large_changed, _ = _round_after_overwriting("shared", not_reverse, updates)
    assert not torch.equal(shared_large["features.0.weight"], shared_large_changed["features.0.weight"])


@pytest.mark.parametrize("split", ["disjoint", "alternating"])
def test_a_split_reverse_distillation_keeps_every_label_beside_its_image(split: str) -> None:
    """Cross-entropy still sees every labelled image with its own label: the labelled head leads the
    reverse images, labelled as the server set, the rest unlabelled (-1)."""
    experiment = _experiment(f"distill.proxy-split='{split}'", "data.proxy-labelled=40", "distill.reverse-ce-weight=1.0")
    labelled = experiment.split.labelled_server
    for round_number in (1, 2):
        (images, labels), _ = experiment.algorithm.distillation_images(round_number)
        assert torch.equal(images[:40], labelled.images) and torch.equal(labels[:40], labelled.labels)
        assert bool((labels[40:] == -1).all()) and len(images) == len(labels)


def test_alternating_halves_start_the_clients_on_the_half_round_1_does_not_reverse_distil() -> None:
    """The initial forward distillation (round 0) uses half 0 only: replacing half 1 leaves the
    clients' first models as they were, replacing half 0 moves them."""
    pretrained = ["distill.proxy-split='alternating'", "data.proxy-labelled=40", "large-init.kind='pretrain'",
                  "large-init.pretrain.epochs=2", "distill.initial-forward-epochs=2"]
    size = len(_experiment().split.proxy_images)
    _, half_0 = distillation_sets("alternating", size, 40, 0)
    _, half_1 = distillation_sets("alternating", size, 40, 1)
    first_models = []
    for replaced in ([], half_1.tolist(), half_0.tolist()):
        experiment = _experiment(*pretrained)
        proxy = experiment.algorithm.server_data.proxy_images
        proxy[replaced] = torch.rand(len(replaced), *proxy.shape[1:], generator=torch.Generator().manual_seed(0))
        first_models.append(experiment.algorithm.initial_state(RoundMetrics()).small["lenet"]["features.0.weight"])
    assert torch.equal(first_models[0], first_models[1]) and not torch.equal(first_models[0], first_models[2])
