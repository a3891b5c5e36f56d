"""The run loop every engine shares: sampling, validation of the replies, the server step,
evaluation, accounting and the run directory with a checkpoint after every round. The clients are
reached through an engine's `Dispatch` (koala.engine.dispatch), whichever engine it is."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from koala.accounting.ledger import resources_summary, round_resources
from koala.algorithms import RoundMetrics
from koala.config import config_to_toml
from koala.engine.dispatch import Dispatch, Replies
from koala.errors import ConfigError
from koala.run.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from koala.run.experiment import Experiment
from koala.run.progress import (
    estimate_time_left,
    format_client_problems,
    format_final,
    format_progress,
    format_savings,
)
from koala.run.provenance import environment
from koala.run.run_dir import (
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    METRICS_FILE,
    RESOURCES_FILE,
    SUMMARY_FILE,
    RunDirectory,
    default_run_dir,
)
from koala.sampling import unreachable_clients
from koala.seeding import GlobalRngState
from koala.state import ServerState

Echo = Callable[[str], None]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


def complete_round(experiment: Experiment, state: ServerState, clients: list[int], replies: Replies) -> tuple[ServerState, dict[str, Any]]:
    """Validate the replies and run the server step; a round with fewer accepted updates than
    `client.min-replies` (or than the clients asked, where a method asks fewer, as the centralised
    one asks none) leaves the server's models as they were."""
    config, algorithm = experiment.config, experiment.algorithm
    metrics = RoundMetrics()
    failed = {failure["client"] for failure in replies.failures}
    accepted = algorithm.accept_updates(state, [c for c in clients if c not in failed], replies.updates, metrics)
    line: dict[str, Any] = {"round": state.round + 1, "clients": len(clients), "accepted": len(accepted)}
    if len(accepted) >= min(config.client.min_replies, len(clients)):
        with metrics.timed("server"):
            state = algorithm.server_round(state, accepted, metrics)
    else:
        state = replace(state, round=state.round + 1)
        line["skipped"] = (
            f"{len(accepted)} accepted update(s), fewer than client.min-replies = {config.client.min_replies}: "
            "the server's models are unchanged"
        )
    examples = sum(u.num_examples for u in accepted)
    line["examples"] = examples
    line["train-loss"] = sum(u.metrics["train-loss"] * u.num_examples for u in accepted) / examples if examples else None
    line.update(metrics.values)
    # a rejected update's claimed training is not trusted: its bytes count, its FLOPs do not
    rejected = {entry["client"] for entry in metrics.rejected}
    exchanges = [replace(e, trained_samples=0) if e.client_id in rejected else e for e in replies.exchanges]
    line["resources"] = round_resources(experiment.costs, exchanges, metrics.work)
    for key, entries in (("rejected", metrics.rejected), ("clipped", metrics.clipped), ("failed", replies.failures)):
        if entries:
            line[key] = entries
    return state, line


def play_round(experiment: Experiment, dispatch: Dispatch, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
    """One round after `state`: sample clients, leave out the ones that drop out, dispatch the
    others' tasks, complete the round and evaluate when due."""
    config, round_number = experiment.config, state.round + 1
    round_start = time.perf_counter()
    clients = experiment.algorithm.round_clients(round_number)
    dropped = unreachable_clients(config.seed, round_number, clients, config.client.dropout_probability)
    unreachable = set(dropped)
    client_start = time.perf_counter()
    replies = dispatch(state, [cid for cid in clients if cid not in unreachable], round_number)
    client_time = time.perf_counter() - client_start
    for cid in dropped:
        replies.fail(cid, f"unreachable this round (simulated: client.dropout-probability = {config.client.dropout_probability:g})")
    state, line = complete_round(experiment, state, clients, replies)
    line["time-clients"] = round(client_time, 4)
    for ledger in experiment.privacy_ledgers():  # what the DP guarantees have spent so far
        line.setdefault("privacy", {}).update(ledger.round_entry(round_number))
    if round_number % config.eval_every == 0 or round_number == config.rounds:
        line.update(evaluation(experiment, state))
    line["time-round"] = round(time.perf_counter() - round_start, 4)
    return state, line


def evaluation(experiment: Experiment, state: ServerState) -> dict[str, Any]:
    """The metrics line's evaluation: the test split under "eval", and the validation split, when
    the run holds one out, under "eval-validation"."""
    algorithm = experiment.algorithm
    results: dict[str, Any] = {"eval": algorithm.evaluate(state)}
    if algorithm.server_data.validation is not None:
        results["eval-validation"] = algorithm.evaluate(state, algorithm.server_data.validation)
    return results


def summarise(
    history: list[dict[str, Any]], description: dict[str, Any], wall_time: float, resources: dict[str, Any]
) -> dict[str, Any]:
    """Start (round 0), final and best test accuracy per model, the resource totals and reductions,
    with the experiment's description. The best is over the federated rounds, never the start: a run
    that only falls under its (pretrained) start reports its best round, not the start."""
    evaluated = [line for line in history if "eval" in line]
    rounds = [line for line in evaluated if line["round"] > 0] or evaluated
    # a model evaluated only in some rounds (KOALA's "averaged:ARCH", after rounds that averaged and forward-distilled)
    models = dict.fromkeys(model for line in rounds for model in line["eval"])
    best = {model: max(line["eval"][model]["accuracy"] for line in rounds if model in line["eval"]) for model in models}
    guarded = [line for line in history if "reverse-guard" in line]
    undone = {"reverse-guard-undone": [line["round"] for line in guarded if not line["reverse-guard"]["kept"]]}
    validation = {}
    if "eval-validation" in evaluated[-1]:
        validation = {"validation": {"start": evaluated[0]["eval-validation"], "final": evaluated[-1]["eval-validation"]}}
    return {
        **description,
        "rounds": history[-1]["round"],
        "start": evaluated[0]["eval"],
        "final": evaluated[-1]["eval"],
        "best-accuracy": best,
        **validation,
        **(undone if guarded else {}),
        "wall-time": round(wall_time, 2),
        "resources": resources["totals"],
        "reductions-vs-fedavg-large": {
            k: v for k, v in resources["reductions-vs-fedavg-large"].items() if k != "per-architecture"
        },
    }


def run_experiment(
    experiment: Experiment, dispatch: Dispatch, out_dir: Path | None = None, echo: Echo = print,
    engine: str = "local", resume: bool = False,
) -> RunResult:
    """Run every round of `experiment`, its clients reached through `dispatch`, writing the run
    directory with a checkpoint after every round. With `resume`, `out_dir` is an existing run
    directory and the run continues from its checkpoint, as if it had never stopped."""
    config = experiment.config
    session_start = time.perf_counter()
    if resume:
        if out_dir is None:
            raise ConfigError("resuming needs the run directory to continue")
        run_dir = RunDirectory.reopen(out_dir)
        checkpoint = load_checkpoint(run_dir.path, config_to_toml(config), experiment.device)
        history = run_dir.restore_metrics(checkpoint.metrics_position)
        run_dir.continue_with(config, checkpoint.state.round)
        checkpoint.rng.restore()
        earlier_sessions = checkpoint.elapsed
        run_dir.mark("running")
    else:
        run_dir = RunDirectory.create(out_dir or default_run_dir(config))
        earlier_sessions = 0.0

    def elapsed() -> float:
        """Seconds the run has taken, over all its sessions."""
        return earlier_sessions + time.perf_counter() - session_start

    description = {**experiment.describe(), "engine": engine}
    echo(f"{description['algorithm']} ({description['mode']}) on {description['dataset']} with the {engine} engine: "
         f"large {description['large']}, small {description['small']}, split {description['split']}")
    for plan in experiment.algorithm.device_plan:
        echo("  " + plan.line())
    try:
        if resume:
            echo(f"resuming {run_dir.path} after round {checkpoint.state.round} of {config.rounds}")
            state = checkpoint.state
        else:
            state, history = _start_run(experiment, run_dir, elapsed)
            echo(format_progress(history[0], config.rounds))
        run_dir.record_session(environment(engine))
        return _run_rounds(experiment, dispatch, run_dir, state, history, description, elapsed, echo)
    except BaseException as exc:  # including Ctrl-C: a started run is marked failed, then the error goes on
        if run_dir.started:
            _mark_failed(run_dir, exc)
        raise


def _mark_failed(run_dir: RunDirectory, error: BaseException) -> None:
    """Record in status.json that the run failed, and how to go on; never hides `error` behind its own."""
    details = {"error": f"{type(error).__name__}: {error}"}
    if (run_dir.path / CHECKPOINT_FILE).is_file():
        details["resume"] = f"koala run --resume {run_dir.path}"
    try:
        run_dir.mark("failed", **details)
    except OSError as exc:  # e.g. the disk is full: the original error is the one to report
        error.add_note(f"(could not mark {run_dir.path} as failed: {exc})")


def _start_run(experiment: Experiment, run_dir: RunDirectory, elapsed: Callable[[], float]) -> tuple[ServerState, list[dict[str, Any]]]:
    """The server's starting state (any pretraining included), written as round 0 of the run directory."""
    start_metrics = RoundMetrics()
    with start_metrics.timed("start"):
        state = experiment.algorithm.initial_state(start_metrics)
    run_dir.start(experiment.config)
    first_line = {
        "round": 0,
        **evaluation(experiment, state),
        **start_metrics.values,
        "resources": round_resources(experiment.costs, [], start_metrics.work),
    }
    _record_round(experiment, run_dir, state, first_line, elapsed)
    return state, [first_line]


def _record_round(experiment: Experiment, run_dir: RunDirectory, state: ServerState, line: dict[str, Any], elapsed: Callable[[], float]) -> None:
    """Append the round's metrics line (flushed to disk), then the checkpoint that counts it."""
    run_dir.append_metrics(line)
    checkpoint = Checkpoint(state, run_dir.metrics_position(), elapsed(), GlobalRngState.capture())
    save_checkpoint(run_dir.path, checkpoint, config_to_toml(experiment.config))


def _run_rounds(
    experiment: Experiment, dispatch: Dispatch, run_dir: RunDirectory, state: ServerState,
    history: list[dict[str, Any]], description: dict[str, Any], elapsed: Callable[[], float], echo: Echo,
) -> RunResult:
    """The rounds after `state` (whose metrics lines so far are `history`), each recorded and
    checkpointed, then the run's resources and summary."""
    config, history = experiment.config, list(history)
    round_seconds: list[float] = []
    for _ in range(state.round, config.rounds):
        round_start = time.perf_counter()
        state, line = play_round(experiment, dispatch, state)
        history.append(line)
        _record_round(experiment, run_dir, state, line, elapsed)
        round_seconds.append(time.perf_counter() - round_start)
        left = estimate_time_left(round_seconds, config.rounds - state.round)
        echo(format_progress(line, config.rounds, elapsed(), left))
        for problem in format_client_problems(line):
            echo(problem)
    resources = resources_summary(experiment.costs, config.models.large, experiment.client_architectures(), history)
    run_dir.write_json(RESOURCES_FILE, resources)
    summary = summarise(history, description, elapsed(), resources)
    for ledger in experiment.privacy_ledgers():
        summary[ledger.summary_key] = ledger.describe(history[-1]["round"])
    run_dir.write_json(SUMMARY_FILE, summary)
    run_dir.mark("complete", rounds=config.rounds)
    echo(format_final(summary))
    echo(format_savings(resources))
    echo(f"wrote {run_dir.path}/ ({CONFIG_FILE}, {METRICS_FILE}, {RESOURCES_FILE}, {SUMMARY_FILE}, {CHECKPOINT_FILE}, "
         f"{ENVIRONMENT_FILE})")
    return RunResult(run_dir.path, history, summary)
