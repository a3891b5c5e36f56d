"""Benchmark: how high reverse distillation can take the large model from one fixed small teacher,
by the size of the transfer set (issue 15: the large model ends under its own small teachers).

A finished KOALA run gives the setting (its data split, pretrained start, distillation loss and
optimiser) and its last state. One more round is played from that state (the local engine): its
averaged small model is the teacher, the model the large one learns from in a round. (Not the
checkpoint's small model: forward distillation has just fitted that one to the large model on the
proxy set, so on the transfer set it mostly repeats the large model.) The large model then starts
again from the run's pretrained start and is distilled from that one teacher, without rounds, for
`--epochs` epochs on the first N proxy images (the labelled ones among them keep their CE term, as
in the run). Its validation accuracy over the last epochs is what distillation from this teacher
gives through N transfer images in that many epochs (a smaller N also means fewer steps); the
table says where the curve still rises. Each epoch of the second half also enters an equal-weight
average of the large model's weights (torch's AveragedModel, BatchNorm buffers included):
whether averaging weights lifts it. `--mixed K` adds K unlabelled images that each mix two of the
N proxy images (weights drawn uniformly, seeded, once), labelled by the teacher. Validation split
only: this is a diagnosis, not a table of results.

`--agreement-only` plays the round and reports only the teacher's agreement with the large model it
taught, on the round's reverse-distillation images, on the images its clients' starting model was
forward-distilled on, and on validation; it also takes runs that split the proxy set
(`distill.proxy-split`), where those two sets differ.

    python benchmarks/distill_ceiling.py --run OUT/RUN --sizes 3000 6000 --epochs 15 [--mixed 6000]
    python benchmarks/distill_ceiling.py --run OUT/RUN --agreement-only
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from koala.algorithms.base import RoundMetrics
from koala.config import ExperimentConfig, config_to_toml
from koala.data.dataset import ImageSplit
from koala.engine.local import local_dispatch
from koala.run.checkpoint import load_checkpoint
from koala.run.experiment import Experiment, prepare_experiment
from koala.run.loop import play_round
from koala.run.run_dir import read_run_config
from koala.seeding import derive_seed
from koala.state import ServerState
from koala.training import evaluate, predict_logits, train_distill
from koala.weights import instantiate

LAST_EPOCHS = 3
"""The ceiling is read as the mean validation accuracy of the last this many epochs."""


def check_reproducible(config: ExperimentConfig, split_allowed: bool = False) -> None:
    """Refuse a run whose reverse distillation this probe would not repeat: one averaged teacher of one
    architecture, the KD loss with the optional CE term, nothing else."""
    distill = config.distill
    levers = {"algorithm": config.algorithm != "koala", "models.small": len(config.models.small) != 1,
              "distill.teacher": distill.teacher != "averaged", "distill.reverse-kd-scaling": distill.reverse_kd_scaling != "none",
              "distill.reverse-selection": distill.reverse_selection != "none",
              "distill.reverse-self-weight": distill.reverse_self_weight > 0,
              "distill.reverse-guard-size": distill.reverse_guard_size > 0, "distill.reverse.flip": distill.reverse.augments,
              "distill.proxy-split": distill.proxy_split != "shared" and not split_allowed}
    if unsupported := [key for key, used in levers.items() if used]:
        raise SystemExit(f"distill_ceiling.py repeats a KOALA run with one small architecture, the averaged teacher and the "
                         f"KD + CE loss only; this run sets {', '.join(unsupported)}")


def mixed_images(images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` images, each a convex mix of two of `images` with a uniform weight (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    first, second = (torch.randint(len(images), (count,), generator=generator) for _ in range(2))
    weight = torch.rand(count, *([1] * (images.dim() - 1)), generator=generator).to(images.device)
    return weight * images[first.to(images.device)] + (1 - weight) * images[second.to(images.device)]


def next_round(experiment: Experiment, state: ServerState) -> tuple[torch.nn.Module, ServerState]:
    """One round after `state` on the local engine: that round's averaged small model (the teacher its
    reverse distillation learned from), and the state after the round."""
    algorithm = experiment.algorithm
    after, _ = play_round(experiment, local_dispatch(algorithm, experiment.split), state)
    (arch, weights), = algorithm.round_models(after).values()
    return instantiate(arch, algorithm.spec, weights, algorithm.device), after


def agreement(first: torch.nn.Module, second: torch.nn.Module, images: torch.Tensor) -> float:
    """The share of `images` on which the two models predict the same class: `first`'s accuracy
    against `second`'s predictions."""
    return evaluate(first, ImageSplit(images, predict_logits(second, images).argmax(1)))["accuracy"]


def played_round(run: Path, split_allowed: bool = False) -> tuple[Experiment, ServerState, torch.nn.Module, ServerState]:
    """`run`'s experiment, its last state, the averaged teacher of the round after it and the state after that round."""
    config = read_run_config(run)
    check_reproducible(config, split_allowed)
    torch.set_num_threads(config.threads)
    experiment = prepare_experiment(config)
    if experiment.algorithm.server_data.validation is None:
        raise SystemExit(f"{run} has no validation split (data.validation-size = 0): the ceiling is read on it")
    state = load_checkpoint(run, config_to_toml(config), experiment.algorithm.device).state
    return experiment, state, *next_round(experiment, state)


def agreements(run: Path) -> dict[str, float]:
    """The averaged teacher of the round after `run`'s last, against the large model it taught: their
    agreement on that round's reverse-distillation images, on the images the previous round
    forward-distilled its clients' starting model on, and on validation."""
    experiment, state, teacher, after = played_round(run, split_allowed=True)
    algorithm = experiment.algorithm
    taught = instantiate(experiment.config.models.large, experiment.spec, state.large, algorithm.device)
    (reverse, _), _ = algorithm.distillation_images(after.round)
    _, forward = algorithm.distillation_images(state.round)
    images = {"reverse": reverse, "forward": forward, "validation": algorithm.server_data.validation.images}
    return {name: agreement(teacher, taught, batch) for name, batch in images.items()}


def ceiling(run: Path, sizes: list[int], epochs: int, mixed: int) -> list[dict[str, Any]]:
    """For each size N: the large model distilled `epochs` epochs from the averaged teacher of the round
    after `run`'s last, on the first N proxy images (plus `mixed` mixed ones), on the validation split:
    after each epoch, and the weights' average over the second half; with the teacher, the start, the
    large model after that round and the teacher's agreement with the large model it taught, on the
    transfer set and on the validation split."""
    experiment, state, teacher, after = played_round(run)
    config, algorithm = experiment.config, experiment.algorithm
    data, device, validation = algorithm.server_data, algorithm.device, algorithm.server_data.validation
    taught = instantiate(config.models.large, algorithm.spec, state.large, device)
    large_after = instantiate(config.models.large, algorithm.spec, after.large, device)
    start = algorithm.initial_large_state(RoundMetrics())
    common = {"round": after.round, "teacher": evaluate(teacher, validation)["accuracy"],
              "run": evaluate(large_after, validation)["accuracy"],
              "start": evaluate(instantiate(config.models.large, algorithm.spec, start, device), validation)["accuracy"],
              "agreement": agreement(teacher, taught, data.proxy_images[:max(sizes)]),
              "agreement-validation": agreement(teacher, taught, validation.images)}
    proxy_labels = algorithm.proxy_labels()  # the run's own CE labels: -1 where the server has none
    results = []
    for size in sizes:
        student = instantiate(config.models.large, algorithm.spec, start, device)
        inputs = data.proxy_images[:size]
        labels = None if proxy_labels is None else proxy_labels[:size]
        if mixed:
            inputs = torch.cat([inputs, mixed_images(inputs, mixed, derive_seed(config.seed, "ceiling-mixed", size))])
            if labels is not None:
                labels = torch.cat([labels, torch.full((mixed,), -1, dtype=torch.long, device=device)])
        targets = algorithm.kd.soft_targets(predict_logits(teacher, inputs))
        reverse = config.distill.reverse.model_copy(update={"epochs": 1})
        average = AveragedModel(student, use_buffers=True)
        momentum, by_epoch = None, []
        for epoch in range(1, epochs + 1):
            outcome = train_distill(student, inputs, targets, algorithm.kd, reverse,
                                    derive_seed(config.seed, "ceiling", size, epoch), labels=labels,
                                    ce_weight=config.distill.reverse_ce_weight, momentum=momentum)
            momentum = outcome.momentum
            by_epoch.append(evaluate(student, validation)["accuracy"])
            if epoch > epochs // 2:
                average.update_parameters(student)
            print(f"size {size} (+{mixed} mixed), epoch {epoch}: {100 * by_epoch[-1]:.2f}", flush=True)
        results.append({**common, "size": size, "by-epoch": by_epoch, "average": evaluate(average.module, validation)["accuracy"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished KOALA run directory (one small architecture)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000], help="transfer-set sizes: the first N proxy images")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--mixed", type=int, default=0, help="mixed images added to the transfer set")
    parser.add_argument("--agreement-only", action="store_true", help="only the teacher's agreement with the large model")
    args = parser.parse_args()
    if args.agreement_only:
        shares = agreements(args.run)
        print("| run | agreement on the round's reverse images | on the images its clients' start was forward-distilled on "
              "| on validation |\n|---|---|---|---|")
        print(f"| {args.run.name} | " + " | ".join(f"{100 * share:.2f}" for share in shares.values()) + " |")
        return
    rows = ["| proxy images | mixed | round | teacher | its agreement with the large model it taught: transfer set, validation | "
            "start | mean of the last 3 epochs | best epoch | average of the second half | the run's large model after the round |",
            "|---:|---:|---:|---|---|---|---|---|---|---|"]
    for result in ceiling(args.run, args.sizes, args.epochs, args.mixed):
        curve = result["by-epoch"]
        best = max(range(len(curve)), key=curve.__getitem__)
        rising = " (still rising)" if best >= len(curve) - LAST_EPOCHS else ""
        rows.append(f"| {result['size']} | {args.mixed} | {result['round']} | {100 * result['teacher']:.2f} | "
                    f"{100 * result['agreement']:.2f}, {100 * result['agreement-validation']:.2f} | {100 * result['start']:.2f} | "
                    f"{100 * sum(curve[-LAST_EPOCHS:]) / len(curve[-LAST_EPOCHS:]):.2f}{rising} | "
                    f"{100 * curve[best]:.2f} (epoch {best + 1}) | {100 * result['average']:.2f} | {100 * result['run']:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
