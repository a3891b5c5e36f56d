"""Benchmark: how high reverse distillation can take the large model from one fixed small teacher,
by the size of the transfer set (issue 15: the large model ends under its own small teachers).

A finished KOALA run gives the setting (its data split, pretrained start, distillation loss and
optimiser) and the teacher: its final small model, the one its clients would receive next. The
large model starts again from the run's pretrained start and is distilled from that one teacher,
without rounds, for `--epochs` epochs on the first N proxy images (the labelled ones among them keep
their CE term, as in the run). Where it levels off on the validation split is what distillation
from this teacher can give through N transfer images. Each epoch of the second half also enters an
equal-weight average of the large model's weights (torch's AveragedModel, BatchNorm buffers
included): whether averaging weights lifts the ceiling. `--mixed K` adds K unlabelled images that
each mix two of the N proxy images (weights drawn uniformly, seeded, once), labelled by the teacher:
whether interpolated transfer points lift it. Validation split only: this is a diagnosis, not a
table of results.

    python benchmarks/distill_ceiling.py --run OUT/RUN --sizes 1500 3000 6000 --epochs 15 [--mixed 6000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from koala.algorithms.base import RoundMetrics
from koala.config import config_to_toml
from koala.run.checkpoint import load_checkpoint
from koala.run.experiment import prepare_experiment
from koala.run.run_dir import read_run_config
from koala.seeding import derive_seed
from koala.training import evaluate, predict_logits, train_distill
from koala.weights import instantiate


def mixed_images(images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` images, each a convex mix of two of `images` with a uniform weight (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    first, second = (torch.randint(len(images), (count,), generator=generator) for _ in range(2))
    weight = torch.rand(count, *([1] * (images.dim() - 1)), generator=generator)
    return weight * images[first] + (1 - weight) * images[second]


def ceiling(run: Path, size: int, epochs: int, mixed: int) -> dict[str, float | list[float]]:
    """The large model distilled `epochs` epochs from `run`'s final small model on the first `size`
    proxy images (plus `mixed` mixed ones): validation accuracy after each epoch, of the weights'
    average over the second half, of the teacher and of the start."""
    config = read_run_config(run)
    torch.set_num_threads(config.threads)
    algorithm = prepare_experiment(config).algorithm
    data, device = algorithm.server_data, algorithm.device
    validation = data.validation
    if validation is None:
        raise SystemExit(f"{run} has no validation split (data.validation-size = 0): the ceiling is read on it")
    (arch, weights), = load_checkpoint(run, config_to_toml(config), device).state.small.items()
    teacher = instantiate(arch, algorithm.spec, weights, device)
    student = instantiate(config.models.large, algorithm.spec, algorithm.initial_large_state(RoundMetrics()), device)
    start_accuracy = evaluate(student, validation)["accuracy"]

    inputs = data.proxy_images[:size]
    labels = torch.full((size,), -1, dtype=torch.long, device=device)
    if data.labelled is not None:
        known = min(size, len(data.labelled))
        labels[:known] = data.labelled.labels[:known]
    if mixed:
        inputs = torch.cat([inputs, mixed_images(inputs, mixed, derive_seed(config.seed, "ceiling-mixed", size))])
        labels = torch.cat([labels, torch.full((mixed,), -1, dtype=torch.long, device=device)])
    targets = algorithm.kd.soft_targets(predict_logits(teacher, inputs))

    reverse = config.distill.reverse.model_copy(update={"epochs": 1})
    average = AveragedModel(student, use_buffers=True)
    momentum, by_epoch = None, []
    for epoch in range(1, epochs + 1):
        outcome = train_distill(student, inputs, targets, algorithm.kd, reverse, derive_seed(config.seed, "ceiling", size, epoch),
                                labels=labels, ce_weight=config.distill.reverse_ce_weight, momentum=momentum)
        momentum = outcome.momentum
        by_epoch.append(evaluate(student, validation)["accuracy"])
        if epoch > epochs // 2:
            average.update_parameters(student)
        print(f"size {size} (+{mixed} mixed), epoch {epoch}: {100 * by_epoch[-1]:.2f}", flush=True)
    return {"teacher": evaluate(teacher, validation)["accuracy"], "start": start_accuracy,
            "by-epoch": by_epoch, "average": evaluate(average.module, validation)["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished KOALA run directory (one small architecture)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000], help="transfer-set sizes: the first N proxy images")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--mixed", type=int, default=0, help="mixed images added to the transfer set")
    args = parser.parse_args()
    rows = ["| proxy images | mixed | teacher | start | best epoch | last epoch | average of the second half |",
            "|---:|---:|---|---|---|---|---|"]
    for size in args.sizes:
        result = ceiling(args.run, size, args.epochs, args.mixed)
        curve = result["by-epoch"]
        best = max(range(len(curve)), key=curve.__getitem__)
        rows.append(f"| {size} | {args.mixed} | {100 * result['teacher']:.2f} | {100 * result['start']:.2f} | "
                    f"{100 * curve[best]:.2f} (epoch {best + 1}) | {100 * curve[-1]:.2f} | {100 * result['average']:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
