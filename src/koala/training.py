"""Training and evaluation loops over tensors already in memory (no DataLoader, no per-sample Python).

One SGD loop serves supervised local training, server pretraining and both distillations: only the
loss on a batch of indices differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from koala.augment import flip_and_shift
from koala.config import DistillOptimizerConfig, OptimizerConfig
from koala.data.dataset import ImageSplit
from koala.distill import Distillation, labelled_cross_entropy
from koala.seeding import derive_seed, seeded_torch

BatchLoss = Callable[[torch.Tensor], torch.Tensor]


def _drops_last(num_examples: int, batch_size: int) -> bool:
    """Whether an epoch drops a trailing batch of one example (BatchNorm cannot train on it)."""
    return num_examples > 1 and num_examples % batch_size == 1


def samples_per_epoch(num_examples: int, batch_size: int) -> int:
    """How many examples one epoch of `shuffled_batches` trains on (what the FLOP accounting counts)."""
    return num_examples - 1 if _drops_last(num_examples, batch_size) else num_examples


def shuffled_batches(num_examples: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Index batches of one epoch in a seeded random order. A trailing batch of one example is
    dropped, since BatchNorm cannot train on it."""
    order = torch.randperm(num_examples, generator=generator).to(device)
    stop = samples_per_epoch(num_examples, batch_size)
    for start in range(0, stop, batch_size):
        yield order[start : min(start + batch_size, stop)]


@dataclass(frozen=True)
class TrainOutcome:
    """What a training call did: the mean loss of its last epoch, the examples it processed over all
    its epochs (what the FLOP accounting counts) and SGD's final momentum buffers by parameter name
    (empty without momentum), for a caller that carries them to its next call."""

    loss: float
    samples: int
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    held_out_passes: int = 0
    """Inference passes of the trained model over held-out examples (early stopping's checks)."""


EpochEnd = Callable[[dict[str, torch.Tensor]], bool]
"""Called after each epoch with SGD's momentum buffers as they stand (by parameter name, not to be
modified); True stops training (early stopping)."""


def sgd_train(
    model: nn.Module, num_examples: int, batch_loss: BatchLoss, settings: OptimizerConfig, seed: int,
    momentum: dict[str, torch.Tensor] | None = None, after_epoch: EpochEnd | None = None,
) -> TrainOutcome:
    """Train `model` for up to `settings.epochs` epochs of SGD.

    `seed` fixes the batch order and the model's own randomness (dropout), which runs on a stream
    of its own: training is a pure function of its inputs and leaves torch's global generator as it was.
    `momentum`, when given, is SGD's momentum buffers (by parameter name) to start from, e.g. those
    a previous call returned in its outcome; it is not modified. `after_epoch` may stop early.
    """
    if settings.epochs == 0 or num_examples == 0:
        return TrainOutcome(float("nan"), 0)
    device = next(model.parameters()).device
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.SGD(
        parameters.values(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    for name, buffer in (momentum or {}).items():
        optimizer.state[parameters[name]]["momentum_buffer"] = buffer.clone()
    schedule = _lr_schedule(optimizer, settings, num_examples)
    order = torch.Generator().manual_seed(seed)
    processed = 0

    def current_momentum() -> dict[str, torch.Tensor]:
        return {name: optimizer.state[p]["momentum_buffer"].detach()
                for name, p in parameters.items() if optimizer.state[p].get("momentum_buffer") is not None}

    with seeded_torch(seed, "layers", device=device):
        for _ in range(settings.epochs):
            model.train()
            total = torch.zeros((), device=device)
            seen = 0
            for batch in shuffled_batches(num_examples, settings.batch_size, order, device):
                loss = batch_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                total += loss.detach() * len(batch)
                seen += len(batch)
            processed += seen
            if after_epoch is not None and after_epoch(current_momentum()):
                break
    return TrainOutcome(float(total / max(seen, 1)), processed, current_momentum())


def _lr_schedule(optimizer: torch.optim.Optimizer, settings: OptimizerConfig, num_examples: int) -> LRScheduler | None:
    """The per-step learning-rate schedule of one training call (None for a constant rate)."""
    if settings.lr_schedule == "constant":
        return None
    steps_per_epoch = -(-samples_per_epoch(num_examples, settings.batch_size) // settings.batch_size)
    return CosineAnnealingLR(optimizer, T_max=max(settings.epochs * steps_per_epoch, 1))


def train_supervised(model: nn.Module, data: ImageSplit, settings: OptimizerConfig, seed: int) -> TrainOutcome:
    """Cross-entropy training on labelled data."""
    return sgd_train(
        model,
        len(data),
        lambda idx: F.cross_entropy(model(data.images[idx]), data.labels[idx]),
        settings,
        seed,
    )


class EarlyStopping:
    """After each epoch, the student's KD loss on a held-out slice; stops once it has not improved
    for `patience` epochs, and `restore_best` puts back the best weights seen (the starting ones
    included, so an epoch that only hurts is undone) and gives the SGD momentum they had, so that a
    caller carrying momentum across calls goes on from the weights it keeps."""

    def __init__(self, model: nn.Module, held_out_loss: Callable[[], float], patience: int,
                 momentum: dict[str, torch.Tensor] | None = None) -> None:
        self.model, self.held_out_loss, self.patience = model, held_out_loss, patience
        self.checks = 1
        self.best = held_out_loss()
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.best_momentum = {k: v.detach().clone() for k, v in (momentum or {}).items()}
        self.epochs_without_gain = 0

    def __call__(self, momentum: dict[str, torch.Tensor]) -> bool:
        loss = self.held_out_loss()
        self.checks += 1
        if loss < self.best:
            self.best, self.epochs_without_gain = loss, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best_momentum = {k: v.clone() for k, v in momentum.items()}
        else:
            self.epochs_without_gain += 1
        return self.epochs_without_gain >= self.patience

    def restore_best(self) -> dict[str, torch.Tensor]:
        """Put the best weights back; returns the momentum buffers they were trained with."""
        self.model.load_state_dict(self.best_state)
        return self.best_momentum


TargetFunction = Callable[[torch.Tensor], torch.Tensor]
"""images -> a teacher's soft targets on them (computed without gradients)."""
Targets = torch.Tensor | TargetFunction
"""What distillation learns from: soft targets fixed on the inputs (N, C), or a teacher's
`TargetFunction` to run on every batch's augmented view (`distillation_targets` chooses)."""


def distillation_targets(teacher: TargetFunction, inputs: torch.Tensor, settings: DistillOptimizerConfig) -> Targets:
    """What `train_distill` is given: the teacher's targets on `inputs`, computed once, or, when
    `settings` augment the batches, the teacher itself, to be run on every batch's view so that
    teacher and student see the same images."""
    return teacher if settings.augments else teacher(inputs)


def train_distill(
    student: nn.Module,
    inputs: torch.Tensor,
    targets: Targets,
    kd: Distillation,
    settings: DistillOptimizerConfig,
    seed: int,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    momentum: dict[str, torch.Tensor] | None = None,
    kd_weight: float = 1.0,
) -> TrainOutcome:
    """Distil soft targets into `student` with `kd_weight` times `kd`'s loss (T²·KL).

    `targets` come from `distillation_targets`: fixed on `inputs`, or a function of images when
    `settings` augment the batches. With `labels` (one per input, -1 where unknown) and
    `ce_weight` > 0, the examples with a known label add `ce_weight` times their cross-entropy. With
    `settings.holdout_fraction` > 0, a seeded slice of the inputs is held out and training stops
    early on its KD loss (`EarlyStopping`): the best weights are kept with their momentum, and the
    outcome counts the held-out checks' inference passes. `momentum` is as in `sgd_train`.
    """
    online = settings.augments
    if online != callable(targets):
        raise ValueError("augmented distillation takes the teacher as a function of images, unaugmented distillation "
                         "its fixed targets: build them with distillation_targets")
    views = torch.Generator(device=inputs.device).manual_seed(derive_seed(seed, "augment")) if online else None

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        if online:
            batch = flip_and_shift(inputs[idx], views, settings.flip, settings.max_shift)
            batch_targets = targets(batch)
        else:
            batch, batch_targets = inputs[idx], targets[idx]
        logits = student(batch)
        loss = kd.loss(logits, batch_targets)
        if kd_weight != 1:
            loss = kd_weight * loss
        if labels is not None and ce_weight != 0:
            loss = loss + ce_weight * labelled_cross_entropy(logits, labels[idx])
        return loss

    held_out = round(settings.holdout_fraction * len(inputs))
    if held_out == 0:
        return sgd_train(student, len(inputs), loss_on, settings, seed, momentum)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(derive_seed(seed, "holdout")))
    order = order.to(inputs.device)
    held, kept = order[:held_out], order[held_out:]
    held_targets = targets(inputs[held]) if online else targets[held]
    stopper = EarlyStopping(
        student,
        lambda: float(kd.loss(predict_logits(student, inputs[held]), held_targets)),
        settings.patience,
        momentum,
    )
    outcome = sgd_train(student, len(kept), lambda idx: loss_on(kept[idx]), settings, seed, momentum, stopper)
    return replace(outcome, momentum=stopper.restore_best(), held_out_passes=stopper.checks * held_out)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of `model` in eval mode on every image."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def evaluate(model: nn.Module, data: ImageSplit, batch_size: int = 512) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on `data`."""
    logits = predict_logits(model, data.images, batch_size)
    return {
        "accuracy": float((logits.argmax(1) == data.labels).float().mean()),
        "loss": float(F.cross_entropy(logits, data.labels)),
    }
