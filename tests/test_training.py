"""The training loops: the labelled cross-entropy term of distillation, SGD momentum carried across
calls, and early stopping on a held-out slice."""

import pytest
import torch

from koala.distill import Distillation
from koala.seeding import derive_seed
from koala.training import predict_logits


def _distil_once(ce_weight: float, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    from koala.config import DistillOptimizerConfig
    from koala.models import InputSpec, build_model
    from koala.training import train_distill

    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 1, 8, 8, generator=g)
    teacher = torch.softmax(torch.randn(40, 10, generator=g), -1)
    torch.manual_seed(0)
    student = build_model("lenet", InputSpec(1, 8, 10))
    train_distill(student, inputs, teacher, Distillation(3.0), DistillOptimizerConfig(epochs=1, batch_size=8), seed=1,
                  labels=labels, ce_weight=ce_weight)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_the_cross_entropy_term_is_exactly_off_at_weight_zero_and_changes_training_when_on() -> None:
    labels = torch.cat([torch.arange(10), torch.full((30,), -1)])
    plain = _distil_once(0.0, None)
    off = _distil_once(0.0, labels)
    on = _distil_once(1.0, labels)
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    assert not all(torch.equal(plain[k], on[k]) for k in plain)


def test_sgd_momentum_carried_across_calls_continues_where_it_stopped() -> None:
    # loss = sum(w): the gradient is 1 every step. SGD, lr 0.1, momentum 0.9, one step per call:
    # step 1 moves w by 0.1 (buffer 1); a second call that carries the buffer moves it by 0.19.
    from koala.config import OptimizerConfig
    from koala.training import sgd_train

    settings = OptimizerConfig(epochs=1, batch_size=2, lr=0.1, momentum=0.9)
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    momentum: dict[str, torch.Tensor] | None = None
    for _ in range(2):
        momentum = sgd_train(model, 2, lambda idx: model.weight.sum(), settings, seed=0, momentum=momentum).momentum
    assert model.weight.item() == pytest.approx(-0.29)
    assert momentum["weight"].item() == pytest.approx(1.9)
    fresh = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(fresh.weight)
    for _ in range(2):
        sgd_train(fresh, 2, lambda idx: fresh.weight.sum(), settings, seed=0)
    assert fresh.weight.item() == pytest.approx(-0.2)


def test_early_stopping_stops_after_patience_epochs_without_gain_and_restores_the_best_weights() -> None:
    from koala.training import EarlyStopping

    model = torch.nn.Linear(1, 1, bias=False)
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.2, 1.0])  # the start, then one per epoch

    def held_out_loss() -> float:
        return next(losses)

    stopper = EarlyStopping(model, held_out_loss, patience=2)
    decisions = []
    for epoch in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(epoch)  # "training" sets the weight to the epoch number
        decisions.append(stopper({}))
        if decisions[-1]:
            break
    assert decisions == [False, False, False, True]  # epochs 3 and 4 did not beat epoch 2's 3.0
    stopper.restore_best()
    assert model.weight.item() == 2.0


def _memorisation_problem() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Random teacher targets on 200 random images and a fresh LeNet student: it can only memorise,
    so a held-out KD loss soon stops falling."""
    from koala.models import InputSpec, build_model

    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 1, 8, 8, generator=g)
    teacher = torch.softmax(3 * torch.randn(200, 10, generator=g), -1)
    torch.manual_seed(0)
    return inputs, teacher, build_model("lenet", InputSpec(1, 8, 10))


def test_distillation_with_a_holdout_stops_early_and_never_ends_worse_than_it_started() -> None:
    # the held-out KD loss soon stops falling, and training stops long before its 40 epochs
    from koala.config import DistillOptimizerConfig
    from koala.distill import kd_loss
    from koala.training import train_distill

    inputs, teacher, student = _memorisation_problem()
    held = torch.randperm(200, generator=torch.Generator().manual_seed(derive_seed(3, "holdout")))[:50]

    def held_out_loss() -> float:
        return float(kd_loss(predict_logits(student, inputs[held]), teacher[held], 1.0))

    start = held_out_loss()
    settings = DistillOptimizerConfig(epochs=40, batch_size=20, lr=0.1, holdout_fraction=0.25, patience=2)
    outcome = train_distill(student, inputs, teacher, Distillation(1.0), settings, seed=3)
    assert outcome.samples % 150 == 0 and 2 * 150 <= outcome.samples < 40 * 150
    assert held_out_loss() <= start


def test_without_a_holdout_every_epoch_runs() -> None:
    from koala.config import DistillOptimizerConfig
    from koala.models import InputSpec, build_model
    from koala.training import train_distill

    student = build_model("lenet", InputSpec(1, 8, 10))
    inputs, teacher = torch.randn(30, 1, 8, 8), torch.full((30, 10), 0.1)
    outcome = train_distill(student, inputs, teacher, Distillation(1.0), DistillOptimizerConfig(epochs=3, batch_size=10), seed=0)
    assert outcome.samples == 90


def test_early_stopping_gives_back_the_momentum_of_the_best_weights() -> None:
    from koala.training import EarlyStopping

    model = torch.nn.Linear(1, 1, bias=False)
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.2])
    stopper = EarlyStopping(model, lambda: next(losses), patience=2, momentum={"weight": torch.full((1, 1), -1.0)})
    for epoch in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(epoch)
        if stopper({"weight": torch.full((1, 1), float(10 * epoch))}):  # the buffers as epoch `epoch` left them
            break
    momentum = stopper.restore_best()
    assert model.weight.item() == 2.0 and momentum["weight"].item() == 20.0  # epoch 2's weights, epoch 2's momentum
    # when no epoch beats the start, the start's weights come back with the momentum they started with
    losses = iter([1.0, 2.0, 3.0])
    start = EarlyStopping(model, lambda: next(losses), patience=2, momentum={"weight": torch.full((1, 1), -1.0)})
    start({"weight": torch.zeros(1, 1)})
    start({"weight": torch.zeros(1, 1)})
    assert start.restore_best()["weight"].item() == -1.0 and start.checks == 3


def test_distillation_with_a_holdout_counts_its_checks_and_keeps_the_best_momentum() -> None:
    from koala.config import DistillOptimizerConfig
    from koala.models import InputSpec, build_model
    from koala.training import train_distill

    inputs, teacher, student = _memorisation_problem()
    carried = {name: torch.zeros_like(p) for name, p in student.named_parameters()}
    settings = DistillOptimizerConfig(epochs=40, batch_size=20, lr=0.1, holdout_fraction=0.25, patience=2)
    outcome = train_distill(student, inputs, teacher, Distillation(1.0), settings, seed=3, momentum=carried)
    epochs = outcome.samples // 150
    assert outcome.held_out_passes == (epochs + 1) * 50  # the start and every epoch, 50 held-out images each
    plain = train_distill(build_model("lenet", InputSpec(1, 8, 10)), inputs, teacher, Distillation(1.0),
                          DistillOptimizerConfig(epochs=2, batch_size=20), seed=3)
    assert plain.held_out_passes == 0
    # the momentum given back is that of the weights kept, not of the last epoch run
    assert outcome.momentum.keys() == carried.keys()
    last_epoch = train_distill(build_model("lenet", InputSpec(1, 8, 10)), inputs, teacher, Distillation(1.0),
                               settings.model_copy(update={"holdout_fraction": 0.0, "epochs": epochs}), seed=3)
    assert any(not torch.equal(outcome.momentum[k], last_epoch.momentum[k]) for k in carried)
