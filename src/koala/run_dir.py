"""The run directory: resolved config, one metrics line per round, and the final summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from koala.config import ExperimentConfig, config_to_toml
from koala.errors import ConfigError

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESOURCES_FILE = "resources.json"


def default_run_dir(config: ExperimentConfig, root: Path = Path("runs")) -> Path:
    return root / f"{config.name}-{config.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDirectory:
    """Writes one run's files. Refuses to write into a directory that already holds a run."""

    def __init__(self, path: Path) -> None:
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"output directory {path} already exists and is not empty; choose another --out")
        self.path = path

    def start(self, config: ExperimentConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / CONFIG_FILE).write_text(config_to_toml(config))
        (self.path / METRICS_FILE).write_text("")

    def append_metrics(self, line: dict[str, Any]) -> None:
        with (self.path / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")

    def write_json(self, name: str, content: dict[str, Any]) -> Path:
        """Write `content` as indented JSON to the run's file `name`."""
        target = self.path / name
        target.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        return target


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics lines of a finished or running run."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {METRICS_FILE} is missing")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_times(value: Any) -> Any:
    """Metrics with every wall-clock field (`time-*`) removed, at any depth: what two runs of the
    same config must agree on."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not k.startswith("time-")}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value
