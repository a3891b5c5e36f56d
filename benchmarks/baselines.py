"""Benchmark: KOALA (both modes, paper-literal and one lever at a time) against the baselines, on
the same split and seeds.

Each row is a config in configs/ plus overrides. Runs every row for every seed with the local
engine, then prints a Markdown table of final test accuracy (mean ± half the range over seeds) and
client and server costs for benchmarks/RESULTS.md, and writes `koala report`'s per-run table and
plots of the same runs to --report. The large model's round-0 accuracy in the KOALA runs is the
server-only pretrained start.

    python benchmarks/baselines.py --seeds 0 1 --rounds 20 --out benchmarks/out --report benchmarks/figures
    python benchmarks/baselines.py --rows paper-literal +ce fedavg-large --seeds 0 --rounds 10 --out /tmp/ab
"""

from __future__ import annotations

import argparse
import json
import statistics
from itertools import accumulate
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from koala.config import load_config
from koala.report import load_run, save_figure, write_report
from koala.run.launch import run_local
from koala.run.run_dir import SUMMARY_FILE, read_metrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
HETEROGENEOUS = ["models.small=['lenet','shufflenetv2-0.5']", "models.small-shares=[0.5,0.5]"]
LEVERS = {
    "paper-literal": [],
    "+ensemble": ["distill.teacher='ensemble'"],
    "+ce": ["distill.reverse-ce-weight=1.0"],
    "+momentum": ["distill.keep-optimizer-state=true"],
    "+forward-mix": ["distill.forward-mix=0.5"],
    "+early-stop": ["distill.reverse.epochs=5", "distill.reverse.holdout-fraction=0.1"],
    "+warm-up": ["distill.forward-warmup-rounds=5"],
    "+kd-scaling": ["distill.reverse-kd-scaling='teacher-quality'"],
    "+augment": [f"distill.{d}.{k}" for d in ("reverse", "forward") for k in ("flip=true", "max-shift=2")],
    "+cosine": [f"distill.{d}.lr-schedule='cosine'" for d in ("reverse", "forward")],
}
# levers that only exist with several architectures: how their teachers are fused
HETEROGENEOUS_LEVERS = {
    "+confidence": ["distill.fusion='confidence'"],
    "+consensus": ["distill.fusion='consensus'"],
}
ROWS: dict[str, tuple[str, list[str]]] = {
    "fedavg-large": ("fedavg-large", []),
    "fedavg-small": ("fedavg-small", []),
    "feddf": ("feddf", []),
    "centralised": ("centralised", []),
    "koala-homogeneous": ("koala-homogeneous", []),
    "koala-heterogeneous": ("koala-heterogeneous", []),
    **{lever: ("paper-literal", overrides) for lever, overrides in LEVERS.items()},
    **{f"{lever} (het)": ("paper-literal", [*HETEROGENEOUS, *overrides])
       for lever, overrides in {**LEVERS, **HETEROGENEOUS_LEVERS}.items()},
    # a lever on top of the shipped defaults, to find the best combination
    **{f"{config} {lever}": (config, overrides) for config in ("koala-homogeneous", "koala-heterogeneous")
       for lever, overrides in LEVERS.items() if lever != "paper-literal"},
    **{f"koala-heterogeneous {lever}": ("koala-heterogeneous", overrides) for lever, overrides in HETEROGENEOUS_LEVERS.items()},
}
DEFAULT_ROWS = ["koala-homogeneous", "koala-heterogeneous", "fedavg-large", "fedavg-small"]


def _run_dir(out: Path, row: str, seed: int) -> Path:
    name = row.replace(" (het)", "-het").replace("+", "plus-").replace(" ", "-")
    return out / f"{name}-seed{seed}"


def run_all(rows: list[str], seeds: list[int], rounds: int, out: Path, overrides: list[str]) -> None:
    for row in rows:
        config_name, row_overrides = ROWS[row]
        for seed in seeds:
            run_dir = _run_dir(out, row, seed)
            if (run_dir / SUMMARY_FILE).is_file():
                print(f"{run_dir} exists, reusing it")
                continue
            config = load_config(CONFIGS / f"{config_name}.toml",
                                 [*row_overrides, f"seed={seed}", f"rounds={rounds}", *overrides])
            run_local(config, run_dir)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    spread = (max(values) - min(values)) / 2
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def table(methods: list[str], seeds: list[int], out: Path) -> str:
    summaries = {
        (m, s): json.loads((_run_dir(out, m, s) / SUMMARY_FILE).read_text())
        for m in methods for s in seeds if (_run_dir(out, m, s) / SUMMARY_FILE).is_file()
    }
    rows = [
        "| method | large model (final) | large model (best round after the start) | small model(s) | client TFLOPs / round "
        "| server TFLOPs / round | client MB / round (down + up) | client storage saved vs FedAvg-large | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # every row of a seed starts from the same pretrained large model: one value per seed
    pretrained = {seed: v["start"]["large"]["accuracy"] for (_, seed), v in summaries.items() if "large" in v["start"]}
    rows.append(f"| large model before federated training (pretrained on the server set) | {_cell(list(pretrained.values()))} "
                "| – | – | – | – | – | – | – |")
    for method in methods:
        runs = [summaries[(method, s)] for s in seeds if (method, s) in summaries]
        if not runs:
            continue
        large = [r["final"]["large"]["accuracy"] for r in runs if "large" in r["final"]]
        best = [b for s in seeds if (method, s) in summaries and (b := _best_after_start(_run_dir(out, method, s))) is not None]
        small_models = sorted({k for r in runs for k in r["final"] if k.startswith("small:")})
        small = ", ".join(f"{k[6:]} {_cell([r['final'][k]['accuracy'] for r in runs])}" for k in small_models)
        wall = statistics.median(r["wall-time"] for r in runs)
        costs = [r for r in runs if "resources" in r]
        flops = _median_per_round(costs, lambda t: t["client-flops"] / 1e12, ".2f")
        server = _median_per_round(costs, lambda t: t["server-flops"] / 1e12, ".2f")
        traffic = _median_per_round(costs, lambda t: (t["bytes-down"] + t["bytes-up"]) / 1e6, ".1f")
        saved = f"{100 * costs[0]['reductions-vs-fedavg-large']['storage']:.1f} %" if costs else "–"
        rows.append(f"| {method} | {_cell(large)} | {_cell(best)} | {small or '–'} | {flops} | {server} | {traffic} "
                    f"| {saved} | {wall:.0f} |")
    return "\n".join(rows)


def _best_after_start(run_dir: Path) -> float | None:
    """The large model's best test accuracy over rounds 1 and later (round 0 is the start)."""
    return max((accuracy for r, accuracy in load_run(run_dir).accuracy("large") if r > 0), default=None)


def _median_per_round(summaries: list[dict], figure, fmt: str) -> str:
    if not summaries:
        return "–"
    return format(statistics.median(figure(s["resources"]) / s["rounds"] for s in summaries), fmt)


def accuracy_by_round(methods: list[str], seeds: list[int], out: Path) -> str:
    """A Markdown table: accuracy of each run's large model (or its small model) at every round."""
    rows = []
    for method in methods:
        for seed in seeds:
            path = _run_dir(out, method, seed)
            if not (path / SUMMARY_FILE).is_file():
                continue
            lines = [line for line in read_metrics(path) if "eval" in line]
            model = "large" if "large" in lines[0]["eval"] else next(iter(lines[0]["eval"]))
            cells = " | ".join(f"{100 * line['eval'][model]['accuracy']:.1f}" for line in lines)
            rows.append(f"| {method} ({model}) | {seed} | {cells} |")
    width = max((row.count("|") - 3 for row in rows), default=0)
    header = "| run | seed | " + " | ".join(f"r{r}" for r in range(width)) + " |"
    return "\n".join([header, "|" + "---|" * (width + 2), *rows])


def plot_rows(rows: list[str], seeds: list[int], out: Path, path: Path) -> None:
    """One figure, two panels: each row's headline accuracy (the large model, else the small one,
    dashed) by round and against the clients' cumulative training FLOPs; the line is the mean over
    seeds, the band their range. Rows without client training (centralised) are left out of the
    FLOPs panel, which is logarithmic."""
    fig, (by_round, by_flops) = plt.subplots(1, 2, figsize=(15, 6))
    for ax in (by_round, by_flops):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 rows, each its own colour
    for row in rows:
        runs = [load_run(run) for seed in seeds if ((run := _run_dir(out, row, seed)) / SUMMARY_FILE).is_file()]
        if not runs:
            continue
        model = runs[0].headline_models()[0]
        rounds = [r for r, _ in runs[0].accuracy(model)]
        accuracy = np.array([[100 * a for _, a in run.accuracy(model)] for run in runs])
        style = {"linestyle": "-" if model == "large" else "--", "marker": "o", "markersize": 2}
        label = row if model == "large" else f"{row} ({model})"
        (line,) = by_round.plot(rounds, accuracy.mean(0), label=label, **style)
        by_round.fill_between(rounds, accuracy.min(0), accuracy.max(0), color=line.get_color(), alpha=0.15)
        spent = np.array([[0.0, *accumulate(r["client-flops"] for r in run.round_resources().values())] for run in runs])
        if spent[:, -1].min() > 0:
            flops = spent.mean(0)[1:]
            by_flops.plot(flops, accuracy.mean(0)[1:], color=line.get_color(), **style)
            by_flops.fill_between(flops, accuracy.min(0)[1:], accuracy.max(0)[1:], color=line.get_color(), alpha=0.15)
    by_round.set(xlabel="round", ylabel="test accuracy (%)", title="Accuracy by round (round 0: the start)")
    by_flops.set(xscale="log", xlabel="cumulative client training FLOPs", ylabel="test accuracy (%)",
                 title="Accuracy against client compute")
    for ax in (by_round, by_flops):
        ax.grid(True, alpha=0.3)
    by_round.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS), metavar="ROW",
                        help=f"rows to run (default: {' '.join(DEFAULT_ROWS)}); one of: {', '.join(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--table-only", action="store_true", help="only print the table of existing runs")
    parser.add_argument("--by-round", action="store_true", help="also print the large model's accuracy by round")
    parser.add_argument("--report", type=Path, default=None, help="also write koala report's table and plots here")
    parser.add_argument("--plot", type=Path, default=None, help="also plot every row's accuracy (mean over seeds) to this PNG")
    args = parser.parse_args()
    if not args.table_only:
        run_all(args.rows, args.seeds, args.rounds, args.out, args.set)
    print(table(args.rows, args.seeds, args.out))
    if args.by_round:
        print()
        print(accuracy_by_round(args.rows, args.seeds, args.out))
    if args.plot:
        plot_rows(args.rows, args.seeds, args.out, args.plot)
        print(f"\nwrote {args.plot}")
    if args.report:
        runs = [_run_dir(args.out, m, s) for m in args.rows for s in args.seeds]
        target = write_report([run for run in runs if (run / SUMMARY_FILE).is_file()], args.report)
        print(f"\nwrote {target} and its plots")


if __name__ == "__main__":
    main()
