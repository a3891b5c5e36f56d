"""Augmented server distillation (flips and shifts, the teacher on the student's view) and the
cosine learning-rate schedule."""

from pathlib import Path

import pytest
import torch
from helpers import BASE, DIGITS_KOALA
from torch import nn

from koala.aggregate import aggregate_by_architecture
from koala.algorithms import RoundMetrics
from koala.augment import flip_and_shift
from koala.config import DistillOptimizerConfig, OptimizerConfig, load_config
from koala.distill import Distillation
from koala.models import InputSpec, build_model
from koala.run.launch import run_local
from koala.training import sgd_train, train_distill


def _images(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 2, 6, 7, generator=torch.Generator().manual_seed(0))


def test_flipping_mirrors_about_half_the_images_and_nothing_else() -> None:
    images = _images()
    views = flip_and_shift(images, torch.Generator().manual_seed(1), flip=True, max_shift=0)
    mirrored = [torch.equal(v, x.flip(-1)) for v, x in zip(views, images)]
    kept = [torch.equal(v, x) for v, x in zip(views, images)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 <= sum(mirrored) <= 48


def test_shifting_moves_each_image_by_at_most_the_limit_and_repeats_the_border() -> None:
    # one bright pixel in the middle of each image: its view holds it moved by at most 2 pixels
    images = torch.zeros(200, 1, 9, 9)
    images[:, 0, 4, 4] = 1.0
    views = flip_and_shift(images, torch.Generator().manual_seed(2), flip=False, max_shift=2)
    assert views.shape == images.shape and torch.equal(views.sum(dim=(1, 2, 3)), torch.ones(200))
    where = views[:, 0].flatten(1).argmax(1)
    moves = torch.stack([where // 9 - 4, where % 9 - 4], dim=1)
    assert moves.abs().max() == 2 and len({tuple(m.tolist()) for m in moves}) == 25  # every offset drawn
    ramp = torch.arange(9.0).expand(1, 1, 9, 9).clone()
    shifted = flip_and_shift(ramp, torch.Generator().manual_seed(3), flip=False, max_shift=8)
    assert set(shifted.unique().tolist()) <= set(range(9))  # border values repeated, no zeros invented


def test_views_repeat_with_the_seed_and_no_augmentation_is_the_identity() -> None:
    images = _images()
    first = flip_and_shift(images, torch.Generator().manual_seed(4), flip=True, max_shift=1)
    again = flip_and_shift(images, torch.Generator().manual_seed(4), flip=True, max_shift=1)
    assert torch.equal(first, again) and not torch.equal(first, images)
    assert flip_and_shift(images, torch.Generator(), flip=False, max_shift=0) is images


class _Recording(nn.Module):
    """A student that remembers every batch it was shown."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(images.detach().clone())
        return self.model(images)


def test_teacher_and_student_see_the_same_augmented_view() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    teacher_model = build_model("lenet", InputSpec(1, 8, 10)).eval()
    shown_to_teacher = []

    def teacher(images: torch.Tensor) -> torch.Tensor:
        shown_to_teacher.append(images.clone())
        with torch.no_grad():
            return torch.softmax(teacher_model(images), -1)

    student = _Recording(build_model("lenet", InputSpec(1, 8, 10)))
    settings = DistillOptimizerConfig(epochs=2, batch_size=8, flip=True, max_shift=2)
    outcome = train_distill(student, inputs, teacher, Distillation(1.0), settings, seed=0)
    assert outcome.samples == 80 and len(student.seen) == len(shown_to_teacher) == 10
    assert all(torch.equal(s, t) for s, t in zip(student.seen, shown_to_teacher))
    originals = {tuple(x.flatten().tolist()) for x in inputs}
    views = [tuple(v.flatten().tolist()) for batch in student.seen for v in batch]
    assert sum(v not in originals for v in views) > 40  # most views differ from every input


def test_augmented_distillation_refuses_fixed_targets() -> None:
    student = build_model("lenet", InputSpec(1, 8, 10))
    with pytest.raises(ValueError, match="teacher as a function of images"):
        train_distill(student, torch.randn(8, 1, 8, 8), torch.full((8, 10), 0.1), Distillation(1.0),
                      DistillOptimizerConfig(flip=True), seed=0)


@pytest.mark.parametrize("schedule, expected_step_sum", [("constant", 8.0), ("cosine", 4.5)])
def test_the_cosine_schedule_decays_the_learning_rate_to_zero(schedule: str, expected_step_sum: float) -> None:
    # A constant gradient of 1 and no momentum: the weight moves by the sum of the step sizes,
    # lr·T for a constant rate and lr·(T + 1)/2 for a cosine over T = 8 steps (2 epochs of 4 batches).
    weight = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(weight.weight)
    settings = OptimizerConfig(epochs=2, batch_size=10, lr=0.1, momentum=0.0, lr_schedule=schedule)
    sgd_train(weight, 40, lambda idx: weight.weight.sum(), settings, seed=0)
    assert weight.weight.item() == pytest.approx(-0.1 * expected_step_sum, rel=1e-5)


DIGITS = [*DIGITS_KOALA, "client.epochs=3", "distill.temperature=1.0", "distill.reverse.epochs=3"]
AUGMENTED = ["distill.reverse.flip=true", "distill.reverse.max-shift=1", "distill.forward.max-shift=1"]


def _round_one(*overrides: str):
    from koala.algorithms.client import local_train
    from koala.run.experiment import prepare_experiment
    from koala.seeding import derive_seed

    experiment = prepare_experiment(load_config(BASE, [*DIGITS, *overrides]))
    algorithm = experiment.algorithm
    state = algorithm.initial_state(RoundMetrics())
    updates = [local_train(algorithm.client_task(state, cid), experiment.split.client_data(cid), experiment.config,
                           experiment.spec, derive_seed(0, "client", 1, cid)) for cid in range(4)]
    return experiment, state, updates


def test_the_online_teacher_gives_the_fixed_targets_on_unaugmented_images() -> None:
    experiment, _, updates = _round_one("models.small=['lenet','mobilenetv3-small']", "distill.teacher='ensemble'")
    groups = aggregate_by_architecture(updates)
    fixed = experiment.algorithm.teacher_targets(updates, groups, RoundMetrics())
    online = experiment.algorithm.round_teacher(updates, groups, RoundMetrics())
    torch.testing.assert_close(online(experiment.split.proxy_images), fixed)


@pytest.mark.parametrize("augmented", [False, True])
def test_the_teacher_runs_once_per_proxy_image_or_once_per_augmented_view(augmented: bool) -> None:
    # large and small are both LeNets: reverse KD trains the large one 3 epochs on the proxy set,
    # forward KD the small one 1 epoch. Fixed targets need one teacher pass over the proxy set per
    # direction; augmented batches need one teacher pass per view trained on.
    experiment, state, updates = _round_one(*(AUGMENTED if augmented else []))
    metrics = RoundMetrics()
    experiment.algorithm.server_round(state, updates, metrics)
    proxy = len(experiment.split.proxy_images)
    trained = metrics.work[("lenet", "train")]
    assert trained == 4 * proxy
    assert metrics.work[("lenet", "inference")] == (trained if augmented else 2 * proxy)


def test_a_run_with_augmented_distillation_learns(tmp_path: Path) -> None:
    # shifts only: a mirrored digit is another digit, or none
    shifts = ["distill.reverse.max-shift=1", "distill.forward.max-shift=1", "rounds=3"]
    result = run_local(load_config(BASE, [*DIGITS, *shifts]), tmp_path / "run", echo=lambda _: None)
    accuracy = {model: [line["eval"][model]["accuracy"] for line in result.metrics] for model in ("large", "small:lenet")}
    assert accuracy["large"][-1] > 0.5 and accuracy["large"][-1] > accuracy["large"][0] + 0.3
    assert accuracy["small:lenet"][-1] > 0.6
