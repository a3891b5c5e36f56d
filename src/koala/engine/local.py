"""The local engine: every client runs in this process, one after another. The fast path for
research and tests; the algorithm is the same one the Flower engine drives."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koala.accounting import ClientExchange, payload_bytes, resources_summary, round_resources
from koala.algorithms import RoundMetrics, ServerState, local_train
from koala.config import ExperimentConfig
from koala.experiment import Experiment, prepare_experiment, sample_clients
from koala.run_dir import CONFIG_FILE, METRICS_FILE, RESOURCES_FILE, SUMMARY_FILE, RunDirectory, default_run_dir
from koala.seeding import derive_seed
from koala.training import trained_samples

Echo = Callable[[str], None]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


def train_round(experiment: Experiment, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
    """One federated round in-process: sample, train each client, validate, and run the server step."""
    config, algorithm = experiment.config, experiment.algorithm
    round_number = state.round + 1
    clients = sample_clients(config.seed, round_number, config.data.num_clients, config.client.participation)
    metrics = RoundMetrics()
    updates, exchanges = [], []
    with metrics.timed("clients"):
        for cid in clients:
            task, data = algorithm.client_task(state, cid), experiment.split.client_data(cid)
            update = local_train(task, data, config, experiment.spec, derive_seed(config.seed, "client", round_number, cid))
            updates.append(update)
            exchanges.append(ClientExchange(
                cid, task.architecture, payload_bytes(task.state), payload_bytes(update.state),
                trained_samples(len(data), config.client),
            ))
    accepted = algorithm.accept_updates(state, updates, metrics)
    with metrics.timed("server"):
        state = algorithm.server_round(state, accepted, metrics)
    examples = sum(u.num_examples for u in accepted)
    line = {
        "round": round_number,
        "clients": len(clients),
        "accepted": len(accepted),
        "examples": examples,
        "train-loss": sum(u.metrics["train-loss"] * u.num_examples for u in accepted) / examples if examples else None,
        **metrics.values,
        "resources": round_resources(experiment.costs, exchanges, metrics.work),
    }
    if metrics.rejected:
        line["rejected"] = metrics.rejected
    return state, line


def format_progress(line: dict[str, Any], total_rounds: int) -> str:
    """One readable line per round."""
    parts = [f"round {line['round']:>3}/{total_rounds}"]
    for model, result in line.get("eval", {}).items():
        parts.append(f"{model} {100 * result['accuracy']:.2f}%")
    if line["round"] > 0:
        parts.append(f"clients {line['accepted']}/{line['clients']}")
        if line["train-loss"] is not None:
            parts.append(f"train-loss {line['train-loss']:.3f}")
        parts.append(f"{line['time-round']:.1f} s")
    return "  ".join(parts)


def run_local(config: ExperimentConfig, out_dir: Path | None = None, echo: Echo = print) -> RunResult:
    """Run a whole experiment in-process, writing its run directory; returns the metrics and summary."""
    experiment = prepare_experiment(config)
    run_dir = RunDirectory(out_dir or default_run_dir(config))
    algorithm = experiment.algorithm
    started = time.perf_counter()
    start_metrics = RoundMetrics()
    with start_metrics.timed("start"):
        state = algorithm.initial_state(start_metrics)
    run_dir.start(config)
    description = experiment.describe()
    echo(f"{description['algorithm']} ({description['mode']}) on {description['dataset']}: large {description['large']}, "
         f"small {description['small']}, split {description['split']}")
    history = [{
        "round": 0,
        "eval": algorithm.evaluate(state),
        **start_metrics.values,
        "resources": round_resources(experiment.costs, [], start_metrics.work),
    }]
    run_dir.append_metrics(history[0])
    echo(format_progress(history[0], config.rounds))
    for round_number in range(1, config.rounds + 1):
        round_start = time.perf_counter()
        state, line = train_round(experiment, state)
        if round_number % config.eval_every == 0 or round_number == config.rounds:
            line["eval"] = algorithm.evaluate(state)
        line["time-round"] = round(time.perf_counter() - round_start, 4)
        run_dir.append_metrics(line)
        history.append(line)
        echo(format_progress(line, config.rounds))
    resources = resources_summary(experiment.costs, config.models.large, experiment.client_architectures(), history)
    run_dir.write_json(RESOURCES_FILE, resources)
    summary = summarise(history, description, time.perf_counter() - started, resources)
    run_dir.write_json(SUMMARY_FILE, summary)
    echo("final: " + "  ".join(f"{m} {100 * r['accuracy']:.2f}%" for m, r in summary["final"].items()))
    echo(format_savings(resources))
    echo(f"wrote {run_dir.path}/ ({CONFIG_FILE}, {METRICS_FILE}, {RESOURCES_FILE}, {SUMMARY_FILE})")
    return RunResult(run_dir.path, history, summary)


def format_savings(resources: dict[str, Any]) -> str:
    """One line: what the clients sent, received and computed, and the savings against FedAvg-large."""
    totals, saved = resources["totals"], resources["reductions-vs-fedavg-large"]

    def pct(key: str) -> str:
        return "n/a" if saved[key] is None else f"{100 * saved[key]:.1f}%"

    return (
        f"clients: {totals['bytes-down'] / 1e6:.1f} MB down, {totals['bytes-up'] / 1e6:.1f} MB up, "
        f"{totals['client-flops'] / 1e12:.3f} TFLOP; against FedAvg-large: storage -{pct('storage')}, "
        f"FLOPs -{pct('client-flops')}, bytes up -{pct('bytes-up')}, bytes down -{pct('bytes-down')}"
    )


def summarise(
    history: list[dict[str, Any]], description: dict[str, Any], wall_time: float, resources: dict[str, Any]
) -> dict[str, Any]:
    """Start, final and best test accuracy per model, the resource totals and reductions, with the
    experiment's description."""
    evaluated = [line for line in history if "eval" in line]
    best = {
        model: max(line["eval"][model]["accuracy"] for line in evaluated)
        for model in evaluated[-1]["eval"]
    }
    return {
        **description,
        "rounds": history[-1]["round"],
        "start": evaluated[0]["eval"],
        "final": evaluated[-1]["eval"],
        "best-accuracy": best,
        "wall-time": round(wall_time, 2),
        "resources": resources["totals"],
        "reductions-vs-fedavg-large": {
            k: v for k, v in resources["reductions-vs-fedavg-large"].items() if k != "per-architecture"
        },
    }
