"""The run directory: resolved config, one metrics line per round, checkpoint, status and the final summary."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from koala.config import ExperimentConfig, config_to_toml, load_config
from koala.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESOURCES_FILE = "resources.json"
STATUS_FILE = "status.json"
ENVIRONMENT_FILE = "environment.json"

RunStatus = Literal["running", "complete", "failed"]


def default_run_dir(config: ExperimentConfig, root: Path = Path("runs")) -> Path:
    return root / f"{config.name}-{config.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_atomically(target: Path, content: bytes) -> None:
    """Write `content` to a temporary file beside `target`, flush it to disk and rename it over
    `target`: a kill at any moment leaves either the old file or the new one, never a torn one."""
    temporary = target.with_name(target.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


@dataclass(frozen=True)
class MetricsPosition:
    """How far metrics.jsonl had got: its length in bytes and the BLAKE2b digest of those bytes."""

    size: int
    digest: str


class RunDirectory:
    """Writes one run's files: `create` for a new run, `reopen` to resume one."""

    def __init__(self, path: Path, started: bool) -> None:
        self.path = path
        self.started = started  # whether the run's files exist: one never started is not marked failed
        self._metrics_size = 0
        self._metrics_digest = hashlib.blake2b(digest_size=32)  # of every byte of metrics.jsonl so far

    @classmethod
    def create(cls, path: Path) -> RunDirectory:
        """A new run's directory; refuses one that already holds files (nothing is overwritten).
        Nothing is written until `start`."""
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"output directory {path} already exists and is not empty; choose another --out")
        return cls(path, started=False)

    @classmethod
    def reopen(cls, path: Path) -> RunDirectory:
        """An existing run's directory, to resume it; anything that is not one is refused."""
        if not path.is_dir():
            raise CheckpointError(f"cannot resume {path}: no such directory; pass the directory a run wrote (its --out)")
        if not (path / CONFIG_FILE).is_file() or not (path / METRICS_FILE).is_file():
            raise CheckpointError(
                f"cannot resume {path}: it is not a koala run directory ({CONFIG_FILE} or {METRICS_FILE} is missing); "
                "pass the directory a run wrote (its --out)"
            )
        return cls(path, started=True)

    def continue_with(self, config: ExperimentConfig, from_round: int) -> None:
        """Make the directory a run of `config` again after round `from_round`: config.toml takes the
        config's round count (the one setting a resumed run may change), and a summary and resources
        written when it ended sooner go, for the run is not finished until round `config.rounds`."""
        if load_config(self.path / CONFIG_FILE).rounds != config.rounds:
            write_atomically(self.path / CONFIG_FILE, config_to_toml(config).encode())
        if from_round < config.rounds:
            for stale in (SUMMARY_FILE, RESOURCES_FILE):
                (self.path / stale).unlink(missing_ok=True)

    def start(self, config: ExperimentConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.started = True
        (self.path / CONFIG_FILE).write_text(config_to_toml(config))
        (self.path / METRICS_FILE).write_text("")
        self.mark("running")

    def append_metrics(self, line: dict[str, Any]) -> None:
        """Append one round's line and flush it to disk (a checkpoint written next may count on it)."""
        text = (json.dumps(line, sort_keys=True) + "\n").encode()
        with (self.path / METRICS_FILE).open("ab") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        self._metrics_size += len(text)
        self._metrics_digest.update(text)

    def metrics_position(self) -> MetricsPosition:
        """Where metrics.jsonl stands now, for a checkpoint to record."""
        return MetricsPosition(self._metrics_size, self._metrics_digest.hexdigest())

    def restore_metrics(self, position: MetricsPosition) -> list[dict[str, Any]]:
        """Cut metrics.jsonl back to `position` (lines written after the checkpoint are dropped) and
        return its lines; a file that is shorter or differs from what the checkpoint recorded is refused."""
        path = self.path / METRICS_FILE
        content = path.read_bytes()
        kept = content[: position.size]
        digest = hashlib.blake2b(kept, digest_size=32)
        if len(content) < position.size or digest.hexdigest() != position.digest:
            raise CheckpointError(
                f"cannot resume {self.path}: {METRICS_FILE} differs from what the checkpoint recorded (edited, "
                "truncated or damaged since). Restore it, or start the run again with its config.toml and a new --out"
            )
        if len(content) > position.size:
            write_atomically(path, kept)
        self._metrics_size, self._metrics_digest = position.size, digest
        return [json.loads(line) for line in kept.decode().splitlines()]

    def write_json(self, name: str, content: dict[str, Any]) -> Path:
        """Write `content` as indented JSON to the run's file `name`, atomically."""
        target = self.path / name
        write_atomically(target, (json.dumps(content, indent=2, sort_keys=True) + "\n").encode())
        return target

    def record_session(self, environment: dict[str, Any]) -> None:
        """Add what this session runs with (commit, versions, threads) to environment.json, which
        lists every session of the run: a resumed run may have been continued by other code."""
        path = self.path / ENVIRONMENT_FILE
        sessions = json.loads(path.read_text())["sessions"] if path.is_file() else []
        self.write_json(ENVIRONMENT_FILE, {"sessions": [*sessions, environment]})

    def mark(self, status: RunStatus, **details: Any) -> None:
        """Record in status.json whether the run is running, complete or failed (with why)."""
        self.write_json(STATUS_FILE, {"status": status, **details})


def read_run_config(path: Path, rounds: int | None = None) -> ExperimentConfig:
    """The config of the run in `path`, to resume it (with `rounds`, to continue it to that many
    rounds); anything that is not a run is refused."""
    return load_config(RunDirectory.reopen(path).path / CONFIG_FILE, [] if rounds is None else [f"rounds={rounds}"])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics lines of a finished or running run."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {METRICS_FILE} is missing")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_times(value: Any) -> Any:
    """Metrics with every wall-clock field (`time-*`) and every client's own measurement of itself
    (`measured`: its peak memory and training time) removed, at any depth: what two runs of the
    same config must agree on."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not k.startswith("time-") and k != "measured"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value
