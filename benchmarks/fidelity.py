"""Benchmark: where KOALA's large model matches FedAvg-large (issue 15, "Fidelity II").

All of Fashion-MNIST in the reference setting: 5,000 training images held out as the validation
split (every choice is made on it), 6,000 as the server's proxy set (its first 1,000 labelled),
the other 49,000 over 20 clients by Dirichlet(0.5); the official 10,000-image test split is only
reported. Each row is a config in configs/ with overrides; rows are grouped by the one dimension
they move around the recipe this map started from: `koala-homogeneous` as issue 7 shipped it,
without the initial forward distillation (row `koala`). The regime map is centred on row
`koala +initial-forward` (that recipe with the initial forward distillation); the recipe that
configs/koala-homogeneous.toml now ships, chosen on validation, is row
`koala +initial-forward lenet-narrow epochs=3 reverse-epochs=3` (SHIPPED).

    python benchmarks/fidelity.py run --rows koala "fedavg-large lr=0.01" --seeds 0 1 2 --out OUT
    python benchmarks/fidelity.py select --group distill-lr --out OUT        # validation only
    python benchmarks/fidelity.py table --group proxy --seeds 0 1 --out OUT  # test split, for RESULTS
    python benchmarks/fidelity.py frontier --out OUT --plot benchmarks/figures/frontier.png
    python benchmarks/fidelity.py by-round --rows koala "fedavg-large lr=0.01" --out OUT [--plot PNG]
    python benchmarks/fidelity.py by-round --rows koala --models large averaged:lenet --out OUT  # the large model and its teacher
    python benchmarks/fidelity.py check --seeds 0 1 2 --out OUT   # runs whose config is no longer their row's
    python benchmarks/fidelity.py batchnorm --rows "fedavg-small lenet" --out OUT  # the small models' BatchNorm statistics

Runs are one torch thread each (`threads=1`); start several processes with disjoint rows to use
more cores. A row's run directory is reused when its summary exists. `run` refuses to start when the
`koala` package it imports is not this checkout's (from a detached worktree beside an editable
install elsewhere, run it with `PYTHONPATH=src`): a run records the commit of the code it ran.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from koala.config import ExperimentConfig, config_to_dict, load_config  # noqa: E402
from koala.errors import KoalaError  # noqa: E402
from koala.report import save_figure  # noqa: E402
from koala.run.checkpoint import CHECKPOINT_FILE  # noqa: E402
from koala.run.launch import run_local  # noqa: E402
from koala.run.provenance import PACKAGE_DIR, checkout_package  # noqa: E402
from koala.run.run_dir import (  # noqa: E402
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    RESOURCES_FILE,
    SUMMARY_FILE,
    read_metrics,
    read_run_config,
)

CHECKOUT = Path(__file__).resolve().parent.parent
CONFIGS = CHECKOUT / "configs"
REFERENCE = ["data.validation-size=5000", "data.proxy-size=6000", "threads=1"]
ROUNDS = 20
LADDER = ["lenet-narrow", "lenet", "mobilenetv3-small-imagenet", "shufflenetv2-0.5-ds", "lenet-wide",
          "mobilenetv3-small", "shufflenetv2-0.5"]
"""The small models, by training FLOPs a sample on 28x28 (1.7 to 54 M)."""


@dataclass(frozen=True)
class Row:
    config: str
    overrides: list[str] = field(default_factory=list)
    rounds: int = ROUNDS
    group: str = ""
    continues: str = ""
    """A row with fewer rounds and otherwise the same config: its finished runs are copied and
    continued to this row's rounds (`koala run --resume RUN_DIR --rounds N`) instead of rerun."""


ISSUE_7_RECIPE = ["distill.initial-forward-epochs=0", "models.small=['lenet']", "client.epochs=1",
                  "distill.reverse.epochs=1"]
"""What configs/koala-homogeneous.toml was before this map (LeNet clients, 1 local epoch, 1 reverse
epoch): the KOALA rows start from it, so that each keeps meaning what it measured whatever the config
now ships. Every lever the config changes since must be pinned here; `check` finds the runs whose
recorded config differs from their row's (tests/test_benchmark_pins.py pins row `koala` itself)."""


def _koala(*overrides: str, group: str, rounds: int = ROUNDS, continues: str = "") -> Row:
    return Row("koala-homogeneous", [*ISSUE_7_RECIPE, *overrides], rounds, group, continues)


INITIAL_FORWARD = ["distill.initial-forward-epochs=10"]
"""The lever the map found first; with ISSUE_7_RECIPE it is row `koala +initial-forward`, the map's centre."""


def _map_row(*overrides: str, group: str) -> Row:
    """A row one dimension away from the map's centre, row `koala +initial-forward`."""
    return _koala(*INITIAL_FORWARD, *overrides, group=group)


SHIPPED_CLIENTS = "koala +initial-forward lenet-narrow epochs=3"
"""The shipped clients (lenet-narrow, 3 local epochs) with 1 reverse epoch: shipped before SHIPPED."""
SHIPPED_CLIENT_LEVERS = [*INITIAL_FORWARD, "models.small=['lenet-narrow']", "client.epochs=3"]
SHIPPED = f"{SHIPPED_CLIENTS} reverse-epochs=3"
"""The row that configs/koala-homogeneous.toml ships (chosen on validation)."""
SHIPPED_LEVERS = [*SHIPPED_CLIENT_LEVERS, "distill.reverse.epochs=3"]
"""What configs/koala-homogeneous.toml ships on top of ISSUE_7_RECIPE (row SHIPPED)."""

HETEROGENEOUS_RECIPE = ["models.small=['lenet', 'shufflenetv2-0.5']", "client.epochs=1", "distill.reverse.epochs=1"]
"""What configs/koala-heterogeneous.toml shipped before it was measured on all the data (half the
clients on LeNet, half on ShuffleNetV2 x0.5, 1 local epoch, 1 reverse epoch): its rows start from it.
Every lever the config changes since must be pinned here (as for ISSUE_7_RECIPE)."""


def _heterogeneous(*overrides: str) -> Row:
    return Row("koala-heterogeneous", [*HETEROGENEOUS_RECIPE, *overrides], group="heterogeneous")


LABEL_FREE = ["distill.reverse-ce-weight=0.0"]
"""The recipe without labels during the rounds (the start stays pretrained on 1,000)."""
ANCHORS = {
    "+initial-forward": INITIAL_FORWARD,
    "+selection": ["distill.reverse-selection='confidence'"],
    "+self=0.3": ["distill.reverse-self-weight=0.3"],
    "+self=0.6": ["distill.reverse-self-weight=0.6"],
    "+initial-forward +selection": ["distill.initial-forward-epochs=10", "distill.reverse-selection='confidence'"],
    "+initial-forward +self=0.3": ["distill.initial-forward-epochs=10", "distill.reverse-self-weight=0.3"],
    "+initial-forward +selection +self=0.3": ["distill.initial-forward-epochs=10",
                                              "distill.reverse-selection='confidence'", "distill.reverse-self-weight=0.3"],
    # the small models then learn from the clients with less (forward mix) or no pull back to the large model
    "+initial-forward +selection +forward-mix=0.5": ["distill.initial-forward-epochs=10",
                                                     "distill.reverse-selection='confidence'", "distill.forward-mix=0.5"],
    "+initial-forward +selection +forward-epochs=0": ["distill.initial-forward-epochs=10",
                                                      "distill.reverse-selection='confidence'", "distill.forward.epochs=0"],
    "+selection +forward-epochs=0": ["distill.reverse-selection='confidence'", "distill.forward.epochs=0"],
}
"""The label-free anchors (issue 15 part 5), alone and combined."""

ROWS: dict[str, Row] = {
    # the reference: issue 7's recipe, run to 40 rounds (its round 20 is the 20-round figure)
    "koala": _koala(group="reference", rounds=40),
    **{f"fedavg-large lr={lr}": Row("fedavg-large", [f"client.lr={lr}"], group="fedavg-large-lr")
       for lr in ("0.003", "0.01", "0.03")},
    # without client momentum: the momentum-0.9 runs are unstable on these non-IID clients
    **{f"fedavg-large lr={lr} momentum=0": Row("fedavg-large", [f"client.lr={lr}", "client.momentum=0.0"],
                                               group="fedavg-large-lr") for lr in ("0.03", "0.1")},
    **{f"fedavg-small {arch}": Row("fedavg-small", [f"models.small=['{arch}']"], 40 if arch == "lenet" else ROUNDS,
                                   "fedavg-small") for arch in LADDER},
    **{f"fedavg-small {arch} epochs={e}": Row("fedavg-small", [f"models.small=['{arch}']", f"client.epochs={e}"],
                                              group="fedavg-small")
       for arch, epochs in (("lenet-narrow", (2, 3, 5)), ("lenet", (2, 5))) for e in epochs},
    # the BatchNorm rungs at a third of the learning rate: at 0.01 their FedAvg swings from round to round
    **{f"fedavg-small {arch} lr=0.003": Row("fedavg-small", [f"models.small=['{arch}']", "client.lr=0.003"],
                                           group="fedavg-small")
       for arch in ("mobilenetv3-small-imagenet", "shufflenetv2-0.5-ds")},
    # distillation learning rates (reverse, forward), one at a time
    **{f"koala {role}-lr={lr}": _koala(f"distill.{role}.lr={lr}", group="distill-lr")
       for role in ("reverse", "forward") for lr in ("0.003", "0.03")},
    # and around the map's centre
    **{f"koala +initial-forward {role}-lr={lr}": _map_row(f"distill.{role}.lr={lr}", group="distill-lr")
       for role in ("reverse", "forward") for lr in ("0.003", "0.03")},
    # proxy-set size, the clients fixed on the same 30,000 images (the most that 24,000 proxy images leave)
    **{f"koala proxy={n}": _koala(f"data.proxy-size={n}", "data.client-size=30000", group="proxy")
       for n in (1200, 6000, 12000, 24000)},
    # the labelled server set: 0 (random start, no CE), 100, 1,000 (the reference), 5,000
    "koala labelled=0": _koala("data.proxy-labelled=0", "large-init.kind='random'", *LABEL_FREE, group="labelled"),
    **{f"koala labelled={n}": _koala(f"data.proxy-labelled={n}", group="labelled") for n in (100, 5000)},
    # FedAvg-large (tuned) from the same 5,000-image start: what `koala +initial-forward labelled=5000` compares with
    "fedavg-large lr=0.003 labelled=5000": Row("fedavg-large", ["client.lr=0.003", "data.proxy-labelled=5000"],
                                               group="labelled"),
    # local epochs, reverse-distillation epochs (with CE)
    **{f"koala epochs={e}": _koala(f"client.epochs={e}", group="epochs") for e in (2, 5)},
    "koala reverse-epochs=3": _koala("distill.reverse.epochs=3", group="reverse-epochs"),
    # the same dimensions around the map's centre (with the initial forward distillation)
    **{f"koala +initial-forward epochs={e}": _map_row(f"client.epochs={e}", group="epochs") for e in (2, 5)},
    **{f"koala +initial-forward proxy={n}": _map_row(f"data.proxy-size={n}", "data.client-size=30000", group="proxy")
       for n in (1200, 6000, 12000, 24000)},
    **{f"koala +initial-forward labelled={n}": _map_row(f"data.proxy-labelled={n}", group="labelled")
       for n in (100, 5000)},
    "koala +initial-forward reverse-epochs=3": _map_row("distill.reverse.epochs=3", group="reverse-epochs"),
    # and on the shipped clients: server work only, the clients' cost unchanged (what the config ships)
    SHIPPED: _koala(*SHIPPED_LEVERS, group="reverse-epochs"),
    # and with twice its proxy set (the clients on the 43,000 images left): in the map 12,000 proxy images
    # brought the large model nearest its teachers
    f"{SHIPPED} proxy=12000": _koala(*SHIPPED_LEVERS, "data.proxy-size=12000", group="proxy"),
    # reverse and forward distillation on different proxy images (distill.proxy-split), so the teachers do not
    # hand the large model back the answers forward distillation just fitted them to (RESULTS, "Why it stays under them")
    **{f"{SHIPPED} +{split}": _koala(*SHIPPED_LEVERS, f"distill.proxy-split='{split}'", group="proxy-split")
       for split in ("disjoint", "alternating")},
    # and with twice the proxy set, so that each distillation has about as many images as the shipped recipe's
    # (halving them cost the averaged teachers 0.31-0.73 on test, 2 seeds)
    **{f"{SHIPPED} proxy=12000 +{split}": _koala(*SHIPPED_LEVERS, "data.proxy-size=12000", f"distill.proxy-split='{split}'",
                                                 group="proxy-split") for split in ("disjoint", "alternating")},
    # is the shipped recipe still climbing at round 20? (its 20-round runs, continued)
    f"{SHIPPED} rounds=40": _koala(*SHIPPED_LEVERS, group="rounds", rounds=40, continues=SHIPPED),
    # and the baseline it is held against, at the same 40 rounds
    "fedavg-large lr=0.003 rounds=40": Row("fedavg-large", ["client.lr=0.003"], 40, "rounds",
                                           continues="fedavg-large lr=0.003"),
    # keeping the large model's better self: 200 of the 1,000 labelled images leave pretraining and CE
    # to undo any round's reverse distillation that lowers the large model's accuracy on them
    f"{SHIPPED_CLIENTS} +guard=200": _koala(*SHIPPED_CLIENT_LEVERS, "distill.reverse-guard-size=200", group="anchors"),
    # the same guard, undoing a round only when it falls more than 2 points (4 of the 200 images): without a
    # tolerance one lucky round stops every later one
    f"{SHIPPED_CLIENTS} +guard=200 tolerance=0.02": _koala(*SHIPPED_CLIENT_LEVERS, "distill.reverse-guard-size=200",
                                                          "distill.reverse-guard-tolerance=0.02", group="anchors"),
    # the distillation loss on the shipped clients: the temperature (both directions; 3 is the default) and
    # the weight of cross-entropy on the labelled images (1 in the config): can the large model pass its teachers?
    **{f"{SHIPPED_CLIENTS} temperature={t}": _koala(*SHIPPED_CLIENT_LEVERS, f"distill.temperature={t}",
                                                    group="reverse-loss") for t in (1, 6)},
    **{f"{SHIPPED_CLIENTS} ce-weight={w}": _koala(*SHIPPED_CLIENT_LEVERS, f"distill.reverse-ce-weight={w}",
                                                  group="reverse-loss") for w in (0.3, 3)},
    # more from the same proxy images: augmented reverse batches (the teachers see the same view), the
    # clients' models as an ensemble instead of their average
    "koala +initial-forward +augment": _map_row("distill.reverse.flip=true", "distill.reverse.max-shift=2",
                                               group="reverse-data"),
    "koala +initial-forward +ensemble": _map_row("distill.teacher='ensemble'", group="reverse-data"),
    # no labels during the rounds (the start pretrained on 1,000), with and without the label-free anchors
    "label-free": _koala(*LABEL_FREE, group="label-free"),
    **{f"label-free {name}": _koala(*LABEL_FREE, *overrides, group="label-free") for name, overrides in ANCHORS.items()},
    # the same anchors beside the labelled CE term of issue 7's recipe
    **{f"koala {name}": _koala(*overrides, group="anchors") for name, overrides in ANCHORS.items()},
    # the ladder of small models, and local epochs on the cheapest ones: the frontier
    **{f"koala {arch}": _koala(f"models.small=['{arch}']", group="ladder") for arch in LADDER if arch != "lenet"},
    **{f"koala lenet-narrow epochs={e}": _koala("models.small=['lenet-narrow']", f"client.epochs={e}", group="ladder")
       for e in (2, 5)},
    # the ladder around the map's centre (lenet-narrow at 3 epochs is what configs/koala-homogeneous.toml's clients train)
    **{f"koala +initial-forward {arch}": _map_row(f"models.small=['{arch}']", group="ladder")
       for arch in LADDER if arch != "lenet"},
    **{f"koala +initial-forward lenet-narrow epochs={e}": _map_row("models.small=['lenet-narrow']", f"client.epochs={e}",
                                                                  group="ladder") for e in (2, 5)},
    SHIPPED_CLIENTS: _koala(*SHIPPED_CLIENT_LEVERS, group="ladder"),
    # heterogeneous mode at full data: as shipped until it was measured, and with two LeNets of different
    # width at the homogeneous recipe's 3 local epochs (weak devices on lenet-narrow, stronger ones on LeNet)
    "heterogeneous": _heterogeneous(),
    "heterogeneous lenet-narrow+lenet epochs=3": _heterogeneous("models.small=['lenet-narrow', 'lenet']", "client.epochs=3"),
    # and with the homogeneous recipe's 3 reverse epochs: what configs/koala-heterogeneous.toml now ships
    "heterogeneous lenet-narrow+lenet epochs=3 reverse-epochs=3": _heterogeneous(
        "models.small=['lenet-narrow', 'lenet']", "client.epochs=3", "distill.reverse.epochs=3"),
}
GROUPS = sorted({row.group for row in ROWS.values()})
SHIPPED_ROWS = {"koala-homogeneous": SHIPPED,
                "koala-heterogeneous": "heterogeneous lenet-narrow+lenet epochs=3 reverse-epochs=3"}
"""The row each shipped KOALA config is, lever for lever (tests/test_benchmark_pins.py checks it)."""


def run_dir(out: Path, row: str, seed: int) -> Path:
    slug = row.replace(" ", "-").replace("=", "").replace("+", "plus-").replace("'", "")
    return out / f"{slug}-seed{seed}"


def run_rows(rows: list[str], seeds: list[int], out: Path, extra: list[str]) -> None:
    for row in rows:
        for seed in seeds:
            target = run_dir(out, row, seed)
            if (target / SUMMARY_FILE).is_file():
                print(f"{target} exists, reusing it")
                continue
            shorter = run_dir(out, ROWS[row].continues, seed) if ROWS[row].continues else None
            if not (target / CHECKPOINT_FILE).is_file() and shorter is not None and (shorter / SUMMARY_FILE).is_file():
                # nothing before its last round depends on the round count: continuing it is rerunning it. The
                # copy leaves the summary behind (it is not this row's) and appears whole or not at all
                print(f"{target}: continuing a copy of {shorter}")
                partial = target.with_name(target.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(shorter, partial, ignore=shutil.ignore_patterns(SUMMARY_FILE, RESOURCES_FILE))
                partial.rename(target)
            if (target / CHECKPOINT_FILE).is_file():  # an interrupted or copied run goes on to the row's rounds
                print(f"{target} is unfinished, resuming it")
                run_local(read_run_config(target, ROWS[row].rounds), target, resume=True)
                continue
            run_local(row_config(row, seed, extra), target)


def foreign_package(checkout: Path, package_dir: Path) -> str | None:
    """Why runs started from `checkout` would not run its code: the `koala` package imported
    (`package_dir`) is another checkout's or an installed copy, whose commit the runs would record
    (e.g. this script in a detached worktree beside the main checkout's editable install); None when
    it is `checkout`'s own."""
    own = checkout_package(checkout)
    if package_dir.resolve() == own:
        return None
    return (f"{checkout / 'benchmarks' / 'fidelity.py'} imports koala from {package_dir}, not from {own}: its runs "
            f"would run that code and record its commit. Run it with PYTHONPATH={checkout / 'src'}")


def row_config(row: str, seed: int, extra: Sequence[str] = ()) -> ExperimentConfig:
    """The config of `row` at `seed`, as this file defines it today."""
    spec = ROWS[row]
    overrides = [*REFERENCE, *spec.overrides, f"seed={seed}", f"rounds={spec.rounds}", *extra]
    return load_config(CONFIGS / f"{spec.config}.toml", overrides)


def _settings(config: ExperimentConfig) -> dict[str, Any]:
    """Every setting of `config` by its dotted key as the config files spell it (`distill.reverse.epochs`)."""
    def flat(value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            return {key: value}
        return {k: v for name, item in value.items() for k, v in flat(item, f"{key}.{name}" if key else name).items()}
    return flat(config_to_dict(config), "")


def config_drift(recorded: ExperimentConfig, row: str, seed: int, extra: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The settings at which a run's `recorded` config differs from what `row` at `seed` (with the
    `extra` overrides it was started with) is today, with both values: empty when the run still
    measures its row."""
    then, now = _settings(recorded), _settings(row_config(row, seed, extra))
    return {key: (then.get(key), now.get(key)) for key in then.keys() | now.keys() if then.get(key) != now.get(key)}


def check(rows: list[str], seeds: list[int], out: Path, extra: Sequence[str]) -> int:
    """Print every finished or interrupted run of `rows` whose recorded config is no longer its row's
    (or cannot be read); the number of such runs."""
    drifted = 0
    for row in rows:
        for seed in seeds:
            target = run_dir(out, row, seed)
            if not (target / CONFIG_FILE).is_file():
                continue
            try:
                drift = config_drift(read_run_config(target), row, seed, extra)
            except KoalaError as error:
                drifted += 1
                print(f"{target.name}: unreadable ({error})")
                continue
            if drift:
                drifted += 1
                print(f"{target.name}: " + ", ".join(f"{key} = {then!r} in the run, {now!r} in the row"
                                                     for key, (then, now) in sorted(drift.items())))
    print(f"{drifted} run(s) differ from their row")
    return drifted


# -- reading runs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRead:
    """One finished run: accuracy by round on either split, costs, and the code that produced it."""

    lines: list[dict[str, Any]]
    summary: dict[str, Any]
    commit: str | None

    @classmethod
    def load(cls, path: Path) -> RunRead | None:
        if not (path / SUMMARY_FILE).is_file():
            return None
        sessions = json.loads((path / ENVIRONMENT_FILE).read_text())["sessions"] if (path / ENVIRONMENT_FILE).is_file() else []
        # a resumed run has one session per start: name each commit, in order, with the instruction set
        # torch's kernels used where the session recorded it (the same seed differs from one to another)
        commits = [s["commit"][:7] + ("+dirty" if s["dirty"] else "") + (f" ({s['cpu-capability']})" if "cpu-capability" in s else "")
                   for s in sessions if s["commit"]]
        commit = "→".join(dict.fromkeys(commits)) or None
        return cls(read_metrics(path), json.loads((path / SUMMARY_FILE).read_text()), commit)

    def headline(self) -> str:
        """The model a run is judged by: the large one where there is one, else its small model."""
        names = list(self.lines[0]["eval"])
        return "large" if "large" in names else names[0]

    def accuracy(self, split: str, model: str | None = None, at_round: int | None = None) -> float | None:
        key = "eval" if split == "test" else "eval-validation"
        model = model or self.headline()
        evaluated = [line for line in self.lines if key in line and (at_round is None or line["round"] <= at_round)]
        if not evaluated or (at_round is not None and evaluated[-1]["round"] != at_round):
            return None
        results = evaluated[-1][key]
        if model.startswith("averaged:") and model not in results:
            return None  # a run from before KOALA evaluated its averaged models, or a round without forward distillation
        return results[model]["accuracy"]

    def best_validation_round(self, at_round: int) -> dict[str, Any] | None:
        """The metrics line of the round (1 to `at_round`) whose headline model did best on the
        validation split; None when the run has not reached `at_round`."""
        validated = [line for line in self.lines if "eval-validation" in line and 0 < line["round"] <= at_round]
        if not validated or validated[-1]["round"] != at_round:
            return None
        return max(validated, key=lambda line: line["eval-validation"][self.headline()]["accuracy"])

    def validation_selected(self, at_round: int) -> tuple[int, float] | None:
        """The best validation round (`best_validation_round`) and its test accuracy: what a user who
        keeps the best model on held-out data ends with."""
        best = self.best_validation_round(at_round)
        return None if best is None else (best["round"], best["eval"][self.headline()]["accuracy"])

    def by_round(self, split: str, model: str | None = None) -> list[tuple[int, float]]:
        key = "eval" if split == "test" else "eval-validation"
        model = model or self.headline()
        return [(line["round"], line[key][model]["accuracy"]) for line in self.lines if key in line and model in line[key]]

    def small_models(self) -> list[str]:
        return [m for m in self.lines[0]["eval"] if m.startswith("small:")]

    def client_flops_per_round(self, at_round: int) -> float:
        return statistics.mean(line["resources"]["client-flops"] for line in self.lines if 0 < line["round"] <= at_round)


def _runs(out: Path, row: str, seeds: list[int]) -> list[RunRead]:
    return [run for seed in seeds if (run := RunRead.load(run_dir(out, row, seed))) is not None]


def cell(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * (max(values) - min(values)) / 2:.2f}"


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def small_cell(runs: list[RunRead], split: str, at_round: int) -> str:
    """Each small model the clients receive after round `at_round` (forward-distilled) and, where every
    run evaluated it, that round's averaged model before forward distillation: KOALA's teacher."""
    parts = []
    for model in runs[0].small_models():
        arch = model.removeprefix("small:")
        averaged = [r.accuracy(split, f"averaged:{arch}", at_round) for r in runs]
        teacher = f" (averaged {cell(averaged)})" if None not in averaged else ""
        parts.append(f"{arch} {cell([r.accuracy(split, model, at_round) for r in runs])}{teacher}")
    return ", ".join(parts)


def table(rows: list[str], seeds: list[int], out: Path, split: str, at_round: int) -> str:
    """Markdown: each row's large model at the start and at `at_round`, its headline model on the
    validation split (what the choices were made on), its small model(s) (`small_cell`), the clients' training
    TFLOPs a round, the seeds and the commit(s) that produced the runs."""
    lines = [f"| row | start | large model, round {at_round} | large model, best validation round ≤ {at_round} "
             f"| validation, round {at_round} | small model(s), round {at_round} | client TFLOPs / round | seeds | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = [r for r in _runs(out, row, seeds) if r.accuracy(split, at_round=at_round) is not None]
        if not runs:
            continue
        has_large = runs[0].headline() == "large"
        start = cell([r.accuracy(split, "large", 0) for r in runs]) if has_large else "–"
        large = cell([r.accuracy(split, at_round=at_round) for r in runs]) if has_large else "–"
        chosen = [r.validation_selected(at_round) for r in runs] if has_large and split == "test" else []
        selected = (f"{cell([c[1] for c in chosen if c])} (rounds {', '.join(str(c[0]) for c in chosen if c)})"
                    if any(chosen) else "–")
        small = small_cell(runs, split, at_round)
        validation = cell([r.accuracy("validation", at_round=at_round) for r in runs])
        flops = statistics.mean(r.client_flops_per_round(at_round) for r in runs) / 1e12
        commits = ", ".join(sorted({r.commit or "?" for r in runs}))
        lines.append(f"| {row} | {start} | {large} | {selected} | {validation} | {small or '–'} | {flops:.3f} | {len(runs)} "
                     f"| {commits} |")
    return "\n".join(lines)


def select(group: str, seeds: list[int], out: Path, at_round: int) -> str:
    """The group's rows (and the reference) ranked by the validation accuracy of their headline model."""
    rows = [name for name, row in ROWS.items() if row.group == group]
    if group not in ("fedavg-large-lr", "fedavg-small", "label-free"):
        # the references that the group's rows move one dimension away from
        rows[:0] = [name for name in ("koala", "koala +initial-forward", SHIPPED_CLIENTS, SHIPPED) if name not in rows]
    ranked = []
    for row in rows:
        runs = _runs(out, row, seeds)
        value = _mean([r.accuracy("validation", at_round=at_round) for r in runs])
        best = _mean([line["eval-validation"][r.headline()]["accuracy"] if (line := r.best_validation_round(at_round))
                      else None for r in runs])
        if value is not None:
            ranked.append((value, best, row))
    ranked.sort(reverse=True)
    return "\n".join([f"validation accuracy: round {at_round}, best round <= {at_round}, row"] +
                     [f"{100 * value:.2f}  {100 * best:.2f}  {row}" for value, best, row in ranked])


def _mean_curves(rows: list[str], seeds: list[int], out: Path, split: str, at_round: int,
                 models: Sequence[str] = ()) -> dict[str, list[tuple[int, float, float, float]]]:
    """Per row with runs and per model (its headline model unless `models` names some, e.g.
    "averaged:lenet-narrow"): (round, mean, lowest, highest) of its accuracy in %, over the rounds
    up to `at_round` that every seed evaluated it."""
    curves = {}
    for row in rows:
        runs = _runs(out, row, seeds)
        for model in (models or [None]) if runs else []:
            by_seed = [dict(r.by_round(split, model)) for r in runs]
            rounds = sorted(n for n in set.intersection(*(set(c) for c in by_seed)) if n <= at_round)
            if rounds:  # a row that never evaluated `model` has no curve
                curves[f"{row} ({model or runs[0].headline()})"] = [
                    (n, 100 * statistics.mean(c[n] for c in by_seed), 100 * min(c[n] for c in by_seed),
                     100 * max(c[n] for c in by_seed)) for n in rounds]
    return curves


def by_round_table(rows: list[str], seeds: list[int], out: Path, split: str, at_round: int, models: Sequence[str] = ()) -> str:
    """Markdown: each row's headline accuracy (or each of `models`') by round, the mean over seeds
    (lowest–highest where there are several)."""
    curves = {label: {n: (mean, low, high) for n, mean, low, high in curve}
              for label, curve in _mean_curves(rows, seeds, out, split, at_round, models).items()}
    lines = [f"| round | {' | '.join(curves)} |", "|---" * (len(curves) + 1) + "|"]
    for n in sorted(set().union(*curves.values())):
        cells = ["–" if n not in curve else f"{curve[n][0]:.2f}" if curve[n][1] == curve[n][2] else
                 f"{curve[n][0]:.2f} ({curve[n][1]:.2f}–{curve[n][2]:.2f})" for curve in curves.values()]
        lines.append(f"| {n} | {' | '.join(cells)} |")
    return "\n".join(lines)


def by_round_plot(rows: list[str], seeds: list[int], out: Path, split: str, at_round: int, path: Path,
                  models: Sequence[str] = ()) -> None:
    fig, ax = plt.subplots(figsize=(9, 6))
    for label, curve in _mean_curves(rows, seeds, out, split, at_round, models).items():
        rounds, mean, low, high = zip(*curve, strict=True)
        (line,) = ax.plot(rounds, mean, "-" if label.endswith("(large)") else "--", marker="o", markersize=2, label=label)
        ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="round", ylabel=f"{split} accuracy (%)", title="Accuracy by round (mean over seeds, range shaded)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def by_round(rows: list[str], seeds: list[int], out: Path, split: str, at_round: int, plot: Path | None,
             models: Sequence[str] = ()) -> None:
    """Print the by-round table up to `at_round`; draw it too where a plot path is given."""
    if not _mean_curves(rows, seeds, out, split, at_round, models):
        raise SystemExit(f"no run of {rows} (seeds {seeds}) in {out} evaluated {list(models) or 'its headline model'} "
                         f"up to round {at_round}: run the rows first, or name models they evaluate (large, small:ARCH, averaged:ARCH)")
    print(by_round_table(rows, seeds, out, split, at_round, models))
    if plot is not None:
        by_round_plot(rows, seeds, out, split, at_round, plot, models)


class FrontierPoint(NamedTuple):
    """One row of the frontier: a method's mean over its runs (seeds)."""

    kind: str  # "KOALA large model", "FedAvg-small" or "FedAvg-large"
    label: str
    flops: float  # the clients' training FLOPs a round
    final: float  # accuracy at the round asked for
    selected: float | None  # accuracy at the best validation round (large models only)
    seeds: int


def frontier(seeds: list[int], out: Path, split: str, at_round: int, plot: Path | None) -> str:
    """The large model's accuracy at `at_round` (and at its best validation round) against the
    clients' training TFLOPs a round, for every small model and local-epoch count, with
    FedAvg-large and each FedAvg-small."""
    points: list[FrontierPoint] = []
    koala_rows = {"koala": "lenet", "koala +initial-forward": "+initial-forward lenet",
                  **{name: name.removeprefix("koala ") for name, row in ROWS.items() if row.group in ("ladder", "epochs", "heterogeneous")}}
    koala_rows[SHIPPED] = SHIPPED.removeprefix("koala ") + ", shipped recipe"
    groups = [(name, "KOALA large model", label) for name, label in koala_rows.items()]
    groups += [(name, "FedAvg-small" if row.group == "fedavg-small" else "FedAvg-large", name.split(" ", 1)[1])
               for name, row in ROWS.items() if row.group in ("fedavg-small", "fedavg-large-lr")]
    for name, kind, label in groups:
        runs = [r for r in _runs(out, name, seeds) if r.accuracy(split, at_round=at_round) is not None]
        if not runs:
            continue
        chosen = [r.validation_selected(at_round) for r in runs] if runs[0].headline() == "large" else []
        selected = statistics.mean(c[1] for c in chosen) if chosen and all(chosen) else None
        points.append(FrontierPoint(kind, label, statistics.mean(r.client_flops_per_round(at_round) for r in runs),
                                    statistics.mean(r.accuracy(split, at_round=at_round) for r in runs), selected,
                                    len(runs)))
    points.sort(key=lambda p: (p.kind, p.flops))  # the plot's points carry their row number in this table
    large_flops = next((p.flops for p in points if p.kind == "FedAvg-large"), None)
    lines = [f"| # | method | model / setting | client TFLOPs / round | fewer than FedAvg-large | {split} accuracy, round {at_round} "
             f"| at the best validation round ≤ {at_round} | seeds |", "|---:|---|---|---|---|---|---|---:|"]
    lines += [f"| {number} | {kind} | {label} | {flops / 1e12:.3f} | "
              f"{'–' if large_flops is None else f'{100 * (1 - flops / large_flops):.1f} %'} "
              f"| {100 * final:.2f} | {'–' if selected is None else f'{100 * selected:.2f}'} | {seeds} |"
              for number, (kind, label, flops, final, selected, seeds) in enumerate(points, start=1)]
    if plot is not None:
        fig, ax = plt.subplots(figsize=(9, 6))
        for kind, marker in (("KOALA large model", "o"), ("FedAvg-small", "s"), ("FedAvg-large", "^")):
            chosen = [p for p in points if p.kind == kind]
            if not chosen:
                continue
            (dots,) = ax.plot([p.flops / 1e12 for p in chosen], [100 * p.final for p in chosen], marker, label=f"{kind}, round {at_round}")
            best = [p for p in chosen if p.selected is not None]
            if best:
                ax.plot([p.flops / 1e12 for p in best], [100 * p.selected for p in best], marker, mfc="none", color=dots.get_color(),
                        label=f"{kind}, best validation round")
        # numbers, not labels: the labels of points a few GFLOPs apart overprint one another; points at one
        # client cost take turns, from the lowest up, to carry their number right and left of the dot
        for number, point in enumerate(points, start=1):
            left = sum(abs(p.flops - point.flops) < 0.02 * point.flops and p.final < point.final for p in points) % 2 == 1
            ax.annotate(str(number), (point.flops / 1e12, 100 * point.final), fontsize=7, xytext=(-3 if left else 3, 3),
                        textcoords="offset points", ha="right" if left else "left")
        tuned = [p.selected for p in points if p.kind == "FedAvg-large" and p.selected is not None]
        if tuned:  # the target: the best-tuned FedAvg-large at its best validation round, less half a point
            ax.axhline(100 * max(tuned) - 0.5, ls="--", lw=0.8, color="grey", label="FedAvg-large (tuned) − 0.5")
        ax.set(xscale="log", xlabel="clients' training TFLOPs a round (all 20 clients)",
               ylabel=f"{split} accuracy (%)", title="Accuracy against client compute (numbers: the rows of the frontier table)", ylim=(75, 90))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        save_figure(fig, plot)
    return "\n".join(lines)


def batchnorm_statistics(rows: list[str], seeds: list[int], out: Path, images: int) -> str:
    """The final small models of the rows' runs on the validation split, with the BatchNorm statistics
    they ended with and with those re-estimated on the server's first `images` proxy images (torch's
    `update_bn`): how much of a model's accuracy its statistics, not its weights, cost. FedAvg averages
    the clients' statistics like weights; averaged statistics need not fit the averaged weights."""
    import torch
    from torch.optim.swa_utils import update_bn

    from koala.config import config_to_toml
    from koala.run.checkpoint import load_checkpoint
    from koala.run.experiment import prepare_experiment
    from koala.weights import evaluate_state, instantiate, module_state

    lines = ["| row | seed | round | small model | validation, its statistics | statistics re-estimated |",
             "|---|---:|---:|---|---|---|"]
    for row in rows:
        for seed in seeds:
            target = run_dir(out, row, seed)
            if not (target / SUMMARY_FILE).is_file():
                continue
            config = read_run_config(target)
            experiment = prepare_experiment(config)
            state = load_checkpoint(target, config_to_toml(config), torch.device("cpu")).state
            validation, proxy = experiment.algorithm.server_data.validation, experiment.split.proxy_images[:images]
            for arch, weights in state.small.items():
                model = instantiate(arch, experiment.spec, weights, "cpu")
                update_bn([proxy[start:start + 250] for start in range(0, len(proxy), 250)], model)
                kept, re_estimated = (evaluate_state(arch, experiment.spec, w, validation)["accuracy"]
                                      for w in (weights, module_state(model)))
                lines.append(f"| {row} | {seed} | {state.round} | {arch} | {100 * kept:.2f} | {100 * re_estimated:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command",
                        choices=["run", "table", "select", "frontier", "by-round", "rows", "check", "batchnorm"])
    parser.add_argument("--rows", nargs="+", default=[], metavar="ROW")
    parser.add_argument("--group", choices=GROUPS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/fidelity2"))
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--at-round", type=int, default=ROUNDS)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--models", nargs="+", default=[], metavar="MODEL",
                        help="by-round: these models (large, small:ARCH, averaged:ARCH) instead of each row's headline")
    parser.add_argument("--images", type=int, default=5000, help="batchnorm: proxy images to re-estimate statistics on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    args = parser.parse_args()
    unknown = [row for row in args.rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; `rows` lists them")
    rows = args.rows or [name for name, row in ROWS.items() if args.group is None or row.group == args.group]
    if args.command == "run" and (foreign := foreign_package(CHECKOUT, PACKAGE_DIR)):
        parser.error(foreign)
    if args.command == "check":
        raise SystemExit(1 if check(rows, args.seeds, args.out, args.set) else 0)
    commands: dict[str, Callable[[], None]] = {
        "run": lambda: run_rows(rows, args.seeds, args.out, args.set),
        "table": lambda: print(table(rows, args.seeds, args.out, args.split, args.at_round)),
        "select": lambda: print(select(args.group, args.seeds, args.out, args.at_round)),
        "frontier": lambda: print(frontier(args.seeds, args.out, args.split, args.at_round, args.plot)),
        "by-round": lambda: by_round(rows, args.seeds, args.out, args.split, args.at_round, args.plot, args.models),
        "batchnorm": lambda: print(batchnorm_statistics(rows, args.seeds, args.out, args.images)),
        "rows": lambda: print("\n".join(f"{name}  [{row.group}] {row.config} {' '.join(row.overrides)} "
                                        f"rounds={row.rounds}" for name, row in ROWS.items())),
    }
    if args.command == "select" and args.group is None:
        parser.error("select needs --group")
    commands[args.command]()


if __name__ == "__main__":
    main()
