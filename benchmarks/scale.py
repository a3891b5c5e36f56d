"""Benchmark: how the local engine scales with the number of clients, and what it costs over a bare loop.

Three measurements, each printing a Markdown table for benchmarks/RESULTS.md:

    # client training, sequential against vectorised (client.vectorised), one round of every client
    python benchmarks/scale.py clients --clients 10 100 1000 --repeats 3
    # whole KOALA runs in a fresh process each: peak resident memory and round time by client count
    python benchmarks/scale.py runs --clients 10 100 1000 --participation 0.1 --rounds 3 --plot benchmarks/figures/round-time-by-clients.png
    # the engine's round against a plain PyTorch loop doing the same training, averaging and distillation
    python benchmarks/scale.py bare-loop --clients 20 --rounds 5 --repeats 3
    # on a GPU: the first two with --device cuda (the clock is read after the GPU's queue is done)
    python benchmarks/scale.py clients --clients 10 100 1000 --repeats 3 --device cuda
    python benchmarks/scale.py runs --clients 100 1000 --participation 0.1 --rounds 3 --device cuda [--vectorised]

Every measurement uses all 60,000 Fashion-MNIST training images (10 % of them the server's proxy
set), LeNet clients and a ResNet-18 server model; ratios are taken within one repeat, then the
median over repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from koala.algorithms.client import local_train
from koala.config import ExperimentConfig, load_config
from koala.distill import kd_loss, soft_targets
from koala.engine.local import vectorised_local_train
from koala.models import build_model
from koala.run.experiment import prepare_experiment
from koala.run.launch import run_local
from koala.state import ClientTask
from koala.weights import initial_state

BASE = ["data.train-limit=0", "data.test-limit=0", "data.partition='iid'", "data.min-client-size=1",
        "models.large='resnet18-ds'", "models.small=['lenet']", "threads=0"]


def _config(clients: int, *overrides: str) -> ExperimentConfig:
    return load_config(None, [*BASE, f"data.num-clients={clients}", *overrides])


def _clock(device: str) -> float:
    """The time once every kernel queued on `device` has run."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def client_training(clients: list[int], repeats: int, device: str) -> str:
    """One round of every client's training, sequential and vectorised, on the same tasks."""
    rows = ["| clients | examples / client | sequential (s) | vectorised (s) | vectorised speed-up |", "|---|---|---|---|---|"]
    for count in clients:
        experiment = prepare_experiment(_config(count, f"device='{device}'"))
        weights = initial_state("lenet", experiment.spec, 0)
        tasks = [ClientTask(cid, "lenet", weights) for cid in range(count)]
        seeds = list(range(count))
        times: dict[str, list[float]] = {"sequential": [], "vectorised": []}
        for _ in range(repeats):
            start = _clock(device)
            for task, seed in zip(tasks, seeds):
                local_train(task, experiment.split.client_data(task.client_id), experiment.config, experiment.spec, seed)
            times["sequential"].append(_clock(device) - start)
            start = _clock(device)
            vectorised_local_train(tasks, experiment.split, experiment.config, experiment.spec, seeds)
            times["vectorised"].append(_clock(device) - start)
        ratio = statistics.median(s / v for s, v in zip(times["sequential"], times["vectorised"]))
        per_client = sum(experiment.split.client_sizes()) // count
        rows.append(f"| {count} | {per_client} | {statistics.median(times['sequential']):.2f} "
                    f"| {statistics.median(times['vectorised']):.2f} | {ratio:.2f}× |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def _one_run(clients: int, participation: float, rounds: int, vectorised: bool, device: str) -> None:
    """In a fresh process: a KOALA run; prints its round times and this process's peak memory
    (and the GPU's, on one)."""
    stamps: list[float] = []

    def echo(line: str) -> None:
        if line.startswith("round"):
            stamps.append(_clock(device))

    config = _config(clients, f"client.participation={participation}", f"rounds={rounds}", f"eval-every={rounds}",
                     f"client.vectorised={str(vectorised).lower()}", "data.proxy-fraction=0.1", f"device='{device}'")
    with tempfile.TemporaryDirectory() as out:
        run_local(config, Path(out) / "run", echo=echo)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu_peak_mb = torch.cuda.max_memory_reserved() / 2**20 if device == "cuda" else None
    print(json.dumps({"clients": clients, "round-seconds": [b - a for a, b in zip(stamps, stamps[1:])],
                      "peak-rss-mb": peak_mb, "peak-gpu-mb": gpu_peak_mb}))


def whole_runs(clients: list[int], participation: float, rounds: int, vectorised: bool, device: str, plot: Path | None) -> str:
    """Peak resident memory and median round time of whole runs, one fresh process per client count."""
    gpu = device == "cuda"
    rows = ["| clients | clients per round | median round time (s) | peak resident memory (MiB) |" + (" peak GPU memory reserved by torch (MiB) |" if gpu else ""),
            "|---|---|---|---|" + ("---|" if gpu else "")]
    results = []
    for count in clients:
        command = [sys.executable, __file__, "one-run", "--clients", str(count), "--participation", str(participation),
                   "--rounds", str(rounds), "--device", device] + (["--vectorised"] if vectorised else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        results.append(result)
        rows.append(f"| {count} | {max(1, round(participation * count))} | {statistics.median(result['round-seconds']):.2f} "
                    f"| {result['peak-rss-mb']:.0f} |" + (f" {result['peak-gpu-mb']:.0f} |" if gpu else ""))
        print(rows[-1], flush=True)
    if plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["clients"] for r in results], [statistics.median(r["round-seconds"]) for r in results], marker="o")
        ax.set(xscale="log", xlabel="clients (participation {:g})".format(participation), ylabel="median round time (s)",
               title="Round time by number of clients (local engine)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=100)
    return "\n".join(rows)


def bare_round(experiment, large: torch.nn.Module, small_weights: dict, round_number: int) -> dict:
    """One KOALA round as a plain PyTorch script would write it: train every client, average,
    reverse-distil into the large model, forward-distil back. Returns the new small weights."""
    config, split = experiment.config, experiment.split
    states, sizes = [], []
    for cid in range(split.num_clients):
        data = split.client_data(cid)
        model = build_model("lenet", experiment.spec)
        model.load_state_dict(small_weights)
        _sgd_epochs(model, data.images, config.client, lambda m, x, i: F.cross_entropy(m(x), data.labels[i]), cid + round_number)
        states.append(model.state_dict())
        sizes.append(len(data))
    total = sum(sizes)
    averaged = {k: sum(s[k].float() * (n / total) for s, n in zip(states, sizes)).to(states[0][k].dtype) for k in states[0]}
    proxy, temperature = split.proxy_images, config.distill.temperature
    teacher = build_model("lenet", experiment.spec)
    teacher.load_state_dict(averaged)
    targets = _soft(teacher, proxy, temperature)
    _sgd_epochs(large, proxy, config.distill.reverse, lambda m, x, i: kd_loss(m(x), targets[i], temperature), round_number)
    back = _soft(large, proxy, temperature)
    student = build_model("lenet", experiment.spec)
    student.load_state_dict(averaged)
    _sgd_epochs(student, proxy, config.distill.forward, lambda m, x, i: kd_loss(m(x), back[i], temperature), round_number)
    return student.state_dict()


@torch.no_grad()
def _soft(model: torch.nn.Module, images: torch.Tensor, temperature: float) -> torch.Tensor:
    model.eval()
    return soft_targets(torch.cat([model(images[i:i + 512]) for i in range(0, len(images), 512)]), temperature)


def _sgd_epochs(model, images, settings, loss_fn, seed: int) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            if len(batch) < 2:
                continue
            loss = loss_fn(model, images[batch], batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def bare_loop(clients: int, rounds: int, repeats: int) -> str:
    """The engine's median round time against the bare loop's, on the same split and settings
    (KOALA as the paper describes it, the large model from random weights, evaluation off)."""
    config = _config(clients, f"rounds={rounds}", f"eval-every={rounds}")
    experiment = prepare_experiment(config)
    rows = ["| repeat | engine median round (s) | bare loop median round (s) | engine / bare |", "|---|---|---|---|"]
    ratios = []
    for repeat in range(repeats):
        stamps: list[float] = []
        with tempfile.TemporaryDirectory() as out:
            run_local(config, Path(out) / "run", echo=lambda line: stamps.append(time.perf_counter()) if line.startswith("round") else None)
        engine = statistics.median(b - a for a, b in zip(stamps[1:-1], stamps[2:]))  # rounds 2.. (no evaluation)
        large = build_model(config.models.large, experiment.spec)
        small = initial_state("lenet", experiment.spec, 0)
        bare_times = []
        for round_number in range(1, rounds):
            start = time.perf_counter()
            small = bare_round(experiment, large, small, round_number)
            bare_times.append(time.perf_counter() - start)
        bare = statistics.median(bare_times)
        ratios.append(engine / bare)
        rows.append(f"| {repeat + 1} | {engine:.2f} | {bare:.2f} | {engine / bare:.3f} |")
        print(rows[-1], flush=True)
    rows.append(f"| median | | | {statistics.median(ratios):.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["clients", "runs", "bare-loop", "one-run"])
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--participation", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vectorised", action="store_true", help="runs: train clients vectorised")
    parser.add_argument("--plot", type=Path, default=None, help="runs: plot round time against clients here")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="clients, runs: where to train")
    args = parser.parse_args()
    if args.what == "bare-loop" and args.device != "cpu":
        parser.error("bare-loop runs on the CPU only; leave out --device")
    if args.what == "one-run":
        _one_run(args.clients[0], args.participation, args.rounds, args.vectorised, args.device)
    elif args.what == "clients":
        print(client_training(args.clients, args.repeats, args.device))
    elif args.what == "runs":
        print(whole_runs(args.clients, args.participation, args.rounds, args.vectorised, args.device, args.plot))
    else:
        print(bare_loop(args.clients[0], args.rounds, args.repeats))


if __name__ == "__main__":
    main()
