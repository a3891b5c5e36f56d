"""Benchmark: accuracy against the uploads' user-level epsilon (issue 19).

KOALA (the shipped homogeneous recipe with LeNet clients at 1 local epoch), FedAvg-small of its
LeNet and FedAvg-large (every client trains the pretrained ResNet-18) on all of Fashion-MNIST over
many small clients, a Poisson sample of them each round, every update clipped to
`client.max-update-norm` and the architecture's sum noised for a target epsilon after the last
round (`privacy.target-epsilon`; sigma solved with dp-accounting, delta = 0.1 / clients). The
server's own data (the proxy set, its 1,000 labelled images, the pretrained start) is not the
clients': KOALA's large model learns from the noised LeNet average and from it.

    python benchmarks/privacy.py run --methods koala fedavg-small --epsilons 1 4 8 inf --seeds 0 1 --out OUT
    python benchmarks/privacy.py run --methods fedavg-large --epsilons 1 inf --seeds 0 --out OUT
    python benchmarks/privacy.py run --methods koala-server-only --epsilons inf --seeds 0 1 --out OUT
    python benchmarks/privacy.py table --out OUT

One torch thread a run; a run directory is reused when its summary exists.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fidelity import RunRead, cell  # the run reader and the mean ± spread cell of the fidelity tables

from koala.config import load_config
from koala.run.launch import run_local
from koala.run.run_dir import SUMMARY_FILE

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SETTING = ["data.num-clients=1000", "data.min-client-size=10", "client.participation=0.1", "client.sampling='poisson'",
           "client.max-update-norm=0.2", "client.lr=0.05", "data.proxy-size=2000", "data.test-limit=2000",
           "data.validation-size=0", "rounds=15", "threads=1"]
"""1,000 clients (49 images each on average), 10 % of them each round, updates clipped to 0.2."""
METHODS = {"koala": "koala-homogeneous", "fedavg-small": "fedavg-small", "fedavg-large": "fedavg-large",
           "koala-server-only": "koala-homogeneous"}
"""koala-server-only is the control: KOALA whose clients do not train (client.epochs = 0), so what
its large model gains is the server's own doing (CE on its labelled images, distillation on its proxy)."""
LENET = "models.small=['lenet']"
"""KOALA's clients hold a LeNet, as this benchmark measured them, whatever the config now ships."""
EXTRA = {"koala": [LENET, "client.epochs=1"], "koala-server-only": [LENET, "client.epochs=0"]}


def run_dir(out: Path, method: str, epsilon: str, seed: int) -> Path:
    return out / f"{method}-eps{epsilon}-seed{seed}"


def run(methods: list[str], epsilons: list[str], seeds: list[int], out: Path) -> None:
    for method in methods:
        for epsilon in epsilons:
            for seed in seeds:
                target = run_dir(out, method, epsilon, seed)
                if (target / SUMMARY_FILE).is_file():
                    continue
                private = [] if epsilon == "inf" else [f"privacy.target-epsilon={epsilon}"]
                overrides = [*SETTING, *EXTRA.get(method, []), *private, f"seed={seed}"]
                config = load_config(CONFIGS / f"{METHODS[method]}.toml", overrides)
                run_local(config, target)


def table(out: Path) -> str:
    """Markdown: per method and epsilon, the solved sigma, the large model's start (round 0), the
    large and small models' final test accuracy (mean ± half the range over seeds) and the commit(s)."""
    cells: dict[tuple[str, str], list[RunRead]] = {}
    for path in sorted(out.glob("*-eps*-seed*")):
        if (run := RunRead.load(path)) is not None:
            method, rest = path.name.rsplit("-eps", 1)
            cells.setdefault((method, rest.split("-seed")[0]), []).append(run)
    lines = ["| method | target ε | σ | ε spent | large model: start | large model | small model | seeds | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {"1": 0, "4": 1, "8": 2, "inf": 3}
    for (method, epsilon), runs in sorted(cells.items(), key=lambda item: (item[0][0], order.get(item[0][1], 9))):
        privacy = runs[0].summary.get("privacy", {})
        sigma = f"{privacy['noise-multiplier']:.3f}" if privacy else "0"
        spent = f"{privacy['epsilon']:.2f}" if privacy else "∞"
        has_large = runs[0].headline() == "large"
        start = cell([r.accuracy("test", "large", 0) for r in runs]) if has_large else "–"
        large = cell([r.accuracy("test", "large") for r in runs]) if has_large else "–"
        small = cell([r.accuracy("test", "small:lenet") for r in runs]) if "small:lenet" in runs[0].small_models() else "–"
        commits = ", ".join(sorted({r.commit or "?" for r in runs}))
        lines.append(f"| {method} | {epsilon} | {sigma} | {spent} | {start} | {large} | {small} | {len(runs)} | {commits} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["koala", "fedavg-small"])
    parser.add_argument("--epsilons", nargs="+", default=["1", "4", "8", "inf"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/privacy"))
    args = parser.parse_args()
    if args.command == "run":
        run(args.methods, args.epsilons, args.seeds, args.out)
    else:
        print(table(args.out))


if __name__ == "__main__":
    main()
