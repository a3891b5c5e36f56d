"""Benchmark: what the per-round checkpoint costs against the round it protects.

Runs a config for a few rounds (a checkpoint is written after each), then times `save_checkpoint`
and `load_checkpoint` of the final server state several times in the same process, and prints the
medians, the file size and the save time as a share of the median round time.

    python benchmarks/checkpoint_overhead.py configs/quickstart.toml --rounds 3 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from koala.config import config_to_toml, load_config
from koala.run.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from koala.run.launch import run_local


def _median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.config, [*args.set, f"rounds={args.rounds}", f"eval-every={args.rounds}"])
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        result = run_local(config, run, echo=lambda _: None)
        round_time = statistics.median(line["time-round"] for line in result.metrics[1:])
        config_toml = config_to_toml(config)
        device = torch.device(config.device)
        checkpoint = load_checkpoint(run, config_toml, device)
        save = _median_seconds(lambda: save_checkpoint(run, checkpoint, config_toml), args.repeats)
        load = _median_seconds(lambda: load_checkpoint(run, config_toml, device), args.repeats)
        size = (run / CHECKPOINT_FILE).stat().st_size
    print(f"| {config.models.large} + {', '.join(config.models.small)} | {size / 1e6:.1f} | {save:.3f} | {load:.3f} "
          f"| {round_time:.2f} | {100 * save / round_time:.1f} % |")


if __name__ == "__main__":
    main()
