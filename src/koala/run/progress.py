"""What a run prints: one line per round, the clients that failed, were rejected or clipped, and the
closing line of what the clients sent, received and computed."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import timedelta
from typing import Any


def format_progress(line: dict[str, Any], total_rounds: int, elapsed: float | None = None, left: float | None = None) -> str:
    """One readable line per round, ending with the run's elapsed time and the estimated time left
    when they are given."""
    parts = [f"round {line['round']:>3}/{total_rounds}"]
    for model, result in line.get("eval", {}).items():
        parts.append(f"{model} {100 * result['accuracy']:.2f}%")
    if line["round"] > 0:
        parts.append(f"clients {line['accepted']}/{line['clients']}")
        for key in ("failed", "rejected", "clipped"):
            if line.get(key):
                parts.append(f"{key} {len(line[key])}")
        if not line.get("reverse-guard", {"kept": True})["kept"]:
            parts.append("reverse distillation undone (guard)")
        if line["train-loss"] is not None:
            parts.append(f"train-loss {line['train-loss']:.3f}")
        privacy = line.get("privacy", {})
        if "epsilon" in privacy:
            parts.append(f"epsilon {privacy['epsilon']:.3g} (delta {privacy['delta']:.2g})")
        if "sample-epsilon" in privacy:
            parts.append(f"DP-SGD epsilon {privacy['sample-epsilon']:.3g}")
        parts.append(f"{line['time-round']:.1f} s")
        if "skipped" in line:
            parts.append("SKIPPED: " + line["skipped"])
    if elapsed is not None:
        parts.append(f"elapsed {timedelta(seconds=round(elapsed))}")
    if left is not None:
        parts.append(f"about {timedelta(seconds=round(left))} left")
    return "  ".join(parts)


def estimate_time_left(round_seconds: Sequence[float], rounds_left: int) -> float:
    """Seconds the remaining rounds should take: the median of the last 5 rounds' times, each."""
    return statistics.median(round_seconds[-5:]) * rounds_left if round_seconds else 0.0


def format_client_problems(line: dict[str, Any]) -> list[str]:
    """One line per client that failed, was rejected or clipped in the round, with the reason."""
    problems = [f"  client {entry['client']} failed: {entry['reason']}" for entry in line.get("failed", [])]
    problems += [f"  client {entry['client']} rejected: {entry['reason']}" for entry in line.get("rejected", [])]
    problems += [f"  client {entry['client']} clipped: update norm {entry['norm']:.4g}" for entry in line.get("clipped", [])]
    return problems


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


def format_final(summary: dict[str, Any]) -> str:
    """The run's last accuracy line: each model's final test accuracy beside its start (round 0),
    so that what federation added is read at a glance."""
    parts = []
    for model, result in summary["final"].items():
        start = summary["start"].get(model, {}).get("accuracy")
        final = 100 * result["accuracy"]
        if start is None:
            parts.append(f"{model} {final:.2f}%")
        else:
            parts.append(f"{model} {final:.2f}% (start {100 * start:.2f}%, {final - 100 * start:+.2f} points)")
    return "final: " + "  ".join(parts)
