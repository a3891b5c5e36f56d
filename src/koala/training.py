"""Training and evaluation loops over tensors already in memory (no DataLoader, no per-sample Python).

One SGD loop serves supervised local training, server pretraining and both distillations: only the
loss on a batch of indices differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from koala.config import OptimizerConfig
from koala.data.dataset import ImageSplit
from koala.distill import kd_loss, kd_with_labels_loss
from koala.seeding import seeded_torch

BatchLoss = Callable[[torch.Tensor], torch.Tensor]


def _drops_last(num_examples: int, batch_size: int) -> bool:
    """Whether an epoch drops a trailing batch of one example (BatchNorm cannot train on it)."""
    return num_examples > 1 and num_examples % batch_size == 1


def samples_per_epoch(num_examples: int, batch_size: int) -> int:
    """How many examples one epoch of `shuffled_batches` trains on (what the FLOP accounting counts)."""
    return num_examples - 1 if _drops_last(num_examples, batch_size) else num_examples


def trained_samples(num_examples: int, settings: OptimizerConfig) -> int:
    """Examples processed by `sgd_train` over all its epochs."""
    return settings.epochs * samples_per_epoch(num_examples, settings.batch_size)


def shuffled_batches(num_examples: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Index batches of one epoch in a seeded random order. A trailing batch of one example is
    dropped, since BatchNorm cannot train on it."""
    order = torch.randperm(num_examples, generator=generator).to(device)
    stop = samples_per_epoch(num_examples, batch_size)
    for start in range(0, stop, batch_size):
        yield order[start : min(start + batch_size, stop)]


def sgd_train(
    model: nn.Module, num_examples: int, batch_loss: BatchLoss, settings: OptimizerConfig, seed: int,
    momentum: dict[str, torch.Tensor] | None = None,
) -> float:
    """Train `model` for `settings.epochs` epochs of SGD; returns the mean loss of the last epoch.

    `seed` fixes the batch order and the model's own randomness (dropout), which runs on a stream
    of its own: training is a pure function of its inputs and leaves torch's global generator as it was.
    `momentum`, when given, carries SGD's momentum buffers (by parameter name) across calls: it is
    loaded before the first step and replaced by the final buffers.
    """
    if settings.epochs == 0 or num_examples == 0:
        return float("nan")
    device = next(model.parameters()).device
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.SGD(
        parameters.values(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    for name, buffer in (momentum or {}).items():
        optimizer.state[parameters[name]]["momentum_buffer"] = buffer.clone()
    order = torch.Generator().manual_seed(seed)
    model.train()
    with seeded_torch(seed, "layers", device=device):
        for _ in range(settings.epochs):
            total = torch.zeros((), device=device)
            seen = 0
            for batch in shuffled_batches(num_examples, settings.batch_size, order, device):
                loss = batch_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(batch)
                seen += len(batch)
    if momentum is not None:
        momentum.clear()
        momentum.update({
            name: optimizer.state[p]["momentum_buffer"].detach()
            for name, p in parameters.items() if optimizer.state[p].get("momentum_buffer") is not None
        })
    return float(total / max(seen, 1))


def train_supervised(model: nn.Module, data: ImageSplit, settings: OptimizerConfig, seed: int) -> float:
    """Cross-entropy training on labelled data; returns the last epoch's mean loss."""
    return sgd_train(
        model,
        len(data),
        lambda idx: F.cross_entropy(model(data.images[idx]), data.labels[idx]),
        settings,
        seed,
    )


def train_distill(
    student: nn.Module,
    inputs: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
    settings: OptimizerConfig,
    seed: int,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    momentum: dict[str, torch.Tensor] | None = None,
) -> float:
    """Distil fixed teacher soft targets into `student` with T²·KL; returns the last epoch's mean loss.
    With `labels` (one per input, -1 where unknown) and `ce_weight` > 0, the examples with a known
    label add `ce_weight` times their cross-entropy. `momentum` is as in `sgd_train`."""
    if labels is None or ce_weight == 0:
        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            return kd_loss(student(inputs[idx]), teacher_probs[idx], temperature)
    else:
        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            return kd_with_labels_loss(student(inputs[idx]), teacher_probs[idx], temperature, labels[idx], ce_weight)
    return sgd_train(student, len(inputs), batch_loss, settings, seed, momentum)


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
