"""Tables and plots from run directories (`koala report`), and the resource table (`koala resources`).

Everything is computed from the files a run writes, so unfinished runs (no summary yet) and runs from
before a field existed (no resources.json) still get a row: missing figures show as "–".
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from koala.accounting.ledger import reduction
from koala.accounting.measure import ModelCost  # noqa: E402
from koala.run.run_dir import CONFIG_FILE, RESOURCES_FILE, SUMMARY_FILE, read_metrics  # noqa: E402

MISSING = "–"
PLOTS = ("accuracy.png", "accuracy-vs-client-flops.png", "bytes-per-round.png")


@dataclass(frozen=True)
class Run:
    """One run directory, read."""

    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    resources: dict[str, Any] | None

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        return [line for line in self.metrics if "eval" in line]

    def headline_models(self) -> list[str]:
        """The model(s) a run is judged by: the large model where there is one, else its small models."""
        if not self.evaluated:
            return []
        names = list(self.evaluated[-1]["eval"])
        return ["large"] if "large" in names else names

    def accuracy(self, model: str) -> list[tuple[int, float]]:
        return [(line["round"], line["eval"][model]["accuracy"]) for line in self.evaluated if model in line["eval"]]

    def round_resources(self) -> dict[int, dict[str, Any]]:
        """The `resources` entry of each federated round (not round 0), by round number."""
        return {line["round"]: line["resources"] for line in self.metrics if line["round"] > 0 and "resources" in line}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(path: Path) -> Run:
    """Read a run directory; it must hold at least metrics.jsonl."""
    metrics = read_metrics(path)
    config_path = path / CONFIG_FILE
    config = tomllib.loads(config_path.read_text()) if config_path.is_file() else {}
    return Run(path.name, config, metrics, _read_json(path / SUMMARY_FILE), _read_json(path / RESOURCES_FILE))


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}"


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return MISSING
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _client_parameters(run: Run) -> str:
    if not run.resources:
        return MISSING
    costs = run.resources["architectures"]
    return ", ".join(f"{arch} {costs[arch]['parameters']:,}" for arch in run.resources["client-architectures"])


def _wall_time(run: Run) -> str:
    if run.summary:
        return f"{run.summary['wall-time']:.0f}"
    times = [line["time-round"] for line in run.metrics if "time-round" in line]
    return f"{sum(times):.0f} (rounds only)" if times else MISSING


def run_row(run: Run) -> list[str]:
    """One row of the comparison table."""
    large = run.accuracy("large")
    small_models = [m for m in (run.evaluated[-1]["eval"] if run.evaluated else {}) if m.startswith("small:")]
    small = ", ".join(f"{m[6:]} {_pct(run.accuracy(m)[-1][1])}" for m in small_models) or MISSING
    rounds = list(run.round_resources().values())
    flops = _mean([r["client-flops"] for r in rounds])
    traffic = _mean([r["bytes-down"] + r["bytes-up"] for r in rounds])
    return [
        run.name,
        run.config.get("algorithm", MISSING),
        (run.summary or {}).get("mode", "heterogeneous" if len(small_models) > 1 else "homogeneous"),
        str(run.metrics[-1]["round"]) if run.metrics else "0",
        _pct(large[-1][1]) if large else MISSING,
        _pct(max(a for r, a in large if r > 0)) if any(r > 0 for r, _ in large) else MISSING,  # the start is no round
        small,
        _client_parameters(run),
        _si(flops, "FLOP"),
        _si(traffic, "B"),
        _wall_time(run),
    ]


TABLE_HEADER = [
    "run", "method", "mode", "rounds", "large final (%)", "large best (%)", "small final (%)",
    "client parameters", "client FLOPs / round", "bytes / round (down + up)", "wall time (s)",
]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(runs: Sequence[Run]) -> str:
    """The Markdown table of `koala report`: one row per run."""
    return markdown_table(TABLE_HEADER, [run_row(run) for run in runs])


def _label(run: Run, model: str) -> str:
    return run.name if model == "large" else f"{run.name} ({model})"


def plot_accuracy(runs: Sequence[Run], path: Path) -> None:
    """Test accuracy of each run's large model (or its small models where it has none) per round."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        for model in run.headline_models():
            rounds, acc = zip(*run.accuracy(model))
            ax.plot(rounds, [100 * a for a in acc], marker="o", markersize=3,
                    linestyle="-" if model == "large" else "--", label=_label(run, model))
    ax.set(xlabel="round", ylabel="test accuracy (%)", title="Large-model accuracy per round (dashed: small model)")
    _finish(fig, ax, path)


def plot_accuracy_vs_flops(runs: Sequence[Run], path: Path) -> None:
    """Accuracy against the clients' cumulative training FLOPs (runs without accounting are left out)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        rounds = run.round_resources()
        spent = dict(zip(rounds, accumulate(r["client-flops"] for r in rounds.values())))
        for model in run.headline_models():
            points = [(spent[r], 100 * a) for r, a in run.accuracy(model) if spent.get(r, 0) > 0]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3,
                        linestyle="-" if model == "large" else "--", label=_label(run, model))
    ax.set_xscale("log")
    ax.set(xlabel="cumulative client training FLOPs", ylabel="test accuracy (%)", title="Accuracy against client compute")
    _finish(fig, ax, path)


def plot_bytes(runs: Sequence[Run], path: Path) -> None:
    """Bytes sent and received by all clients in each round."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        points = [(r, res["bytes-down"] + res["bytes-up"]) for r, res in run.round_resources().items()]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=run.name)
    ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="bytes (down + up, all clients)", title="Client traffic per round")
    _finish(fig, ax, path)


def _finish(fig: Any, ax: Any, path: Path) -> None:
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Lay `fig` out, write it to `path` as a PNG (its folder made as needed) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write report.md (the table and the plots) and the PNG plots into `out`; returns report.md."""
    runs = [load_run(path) for path in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(runs, out / PLOTS[0])
    plot_accuracy_vs_flops(runs, out / PLOTS[1])
    plot_bytes(runs, out / PLOTS[2])
    body = [
        "# koala-fl report", "",
        comparison_table(runs), "",
        *(f"![{name[:-4]}]({name})" for name in PLOTS),
    ]
    target = out / "report.md"
    target.write_text("\n".join(body) + "\n")
    return target


def cost_table(costs: Sequence[ModelCost], large: ModelCost) -> str:
    """The `koala resources` table: each model's costs, and each small model's savings against `large`."""
    header = [
        "model", "parameters", "state (MB)", "training GFLOPs / sample", "inference GFLOPs / sample",
        "training memory (MB)", "storage saved (%)", "training FLOPs saved (%)", "training memory saved (%)",
    ]
    rows = []
    for cost in costs:
        saved = [
            _pct(reduction(cost.state_bytes, large.state_bytes)),
            _pct(reduction(cost.train_flops_per_sample, large.train_flops_per_sample)),
            _pct(reduction(cost.train_memory_bytes, large.train_memory_bytes)),
        ] if cost is not large else [MISSING] * 3
        rows.append([
            cost.architecture, f"{cost.parameters:,}", f"{cost.state_bytes / 1e6:.2f}",
            f"{cost.train_flops_per_sample / 1e9:.4g}", f"{cost.inference_flops_per_sample / 1e9:.4g}",
            f"{cost.train_memory_bytes / 1e6:.1f}", *saved,
        ])
    return markdown_table(header, rows)
