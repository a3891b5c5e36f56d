"""Benchmark: the local engine against Flower's simulation engine on the same KOALA workload.

For each client count, runs the same config with `--engine local` and `--engine flower-sim` one
after the other (so the ratio is measured in one run, on the same machine state), checks that both
wrote the same metrics, and prints wall times. Also prints the bytes a round moves as Flower counts
them (`ArrayRecord.count_bytes()`, the figure Flower's `arrays_size_mod` logs) next to koala-fl's
accounting (safetensors payloads).

    python benchmarks/flower_vs_local.py --clients 10 100 --rounds 5 --out /tmp/flower-bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flwr.app import ArrayRecord

from koala.config import load_config
from koala.engine.flower.simulation import run_flower_simulation
from koala.models import InputSpec
from koala.run.launch import run_local
from koala.run.run_dir import without_times
from koala.weights import initial_state

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/flower"))
    args = parser.parse_args()
    rows = ["| clients | local (s) | flower-sim (s) | flower-sim / local | same metrics | "
            "bytes down / round: Flower ArrayRecord | koala-fl accounting |", "|---|---|---|---|---|---|---|"]
    for clients in args.clients:
        overrides = [f"data.num-clients={clients}", f"rounds={args.rounds}", f"eval-every={args.rounds}",
                     "threads=1", "data.min-client-size=20"]
        config = load_config(CONFIG, overrides)
        start = time.perf_counter()
        local = run_local(config, args.out / f"local-{clients}", echo=lambda _: None)
        local_time = time.perf_counter() - start
        start = time.perf_counter()
        simulated = run_flower_simulation(config, args.out / f"sim-{clients}", echo=lambda _: None)
        sim_time = time.perf_counter() - start
        same = without_times(local.metrics) == without_times(simulated.metrics)
        small = config.models.small[0]
        spec = InputSpec(1, 28, 10)
        flower_bytes = ArrayRecord(initial_state(small, spec, 0)).count_bytes() * clients
        ours = local.metrics[1]["resources"]["bytes-down"]
        rows.append(f"| {clients} | {local_time:.1f} | {sim_time:.1f} | {sim_time / local_time:.2f} | {same} | "
                    f"{flower_bytes:,} | {ours:,} |")
        print(json.dumps({"clients": clients, "local": local_time, "flower-sim": sim_time, "same-metrics": same}), flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
