"""Checkpoints: everything a run needs to continue after round k, in one safetensors file.

The file holds the server state (the large model, the small model of every architecture and any
momentum the server keeps across rounds), the global random generators' states, and as metadata
the round, how far metrics.jsonl had got (its length and digest: the lines themselves stay in that
file, so a checkpoint's size does not grow with the rounds), the run's elapsed time and the config
it was written with. It is written atomically (a temporary file, flushed to disk, then renamed
over the old one), so a kill at any moment leaves either the previous checkpoint or the new one.
A digest over every tensor and every metadata field catches a damaged file; safetensors never
unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from koala.config import config_from_toml
from koala.errors import CheckpointError, ConfigError
from koala.run.run_dir import CONFIG_FILE, MetricsPosition, write_atomically
from koala.seeding import GlobalRngState
from koala.state import ServerState

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "koala-fl checkpoint 1"
_LARGE, _SMALL, _OPTIMIZER, _RNG = "large/", "small/", "optimizer/", "rng/"


@dataclass(frozen=True)
class Checkpoint:
    """A run as it stood after round `state.round`."""

    state: ServerState
    metrics_position: MetricsPosition
    """metrics.jsonl as it stood with the line of round `state.round` appended."""
    elapsed: float
    """Seconds the run had taken up to this point, over all its sessions."""
    rng: GlobalRngState


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint, config_toml: str) -> Path:
    """Write `checkpoint` to `run_dir`/checkpoint.safetensors atomically; returns its path."""
    tensors = _state_tensors(checkpoint.state)
    rng_tensors, rng_meta = _rng_tensors(checkpoint.rng)
    tensors.update(rng_tensors)
    metadata = {
        "format": FORMAT,
        "round": str(checkpoint.state.round),
        "metrics-size": str(checkpoint.metrics_position.size),
        "metrics-digest": checkpoint.metrics_position.digest,
        "elapsed": repr(checkpoint.elapsed),
        "config": config_toml,
        "rng": json.dumps(rng_meta),
    }
    metadata["digest"] = _digest(tensors, metadata)
    target = run_dir / CHECKPOINT_FILE
    write_atomically(target, save(tensors, metadata=metadata))
    return target


def load_checkpoint(run_dir: Path, config_toml: str, device: torch.device) -> Checkpoint:
    """The checkpoint in `run_dir`, its tensors on `device`. A missing, damaged or foreign file, or
    a config.toml that no longer matches it, raises `CheckpointError` saying what to do. The config
    may differ from the checkpoint's in its round count alone (a run continued past its end, or
    ended sooner), down to the checkpoint's own round."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} has no {CHECKPOINT_FILE}: the run stopped before its first checkpoint was written. "
            f"Start it again with: koala run {run_dir / CONFIG_FILE} --out NEW_DIR"
        )
    tensors, metadata = _read(path)
    try:
        round_number = int(metadata["round"])
    except (KeyError, ValueError) as exc:
        raise _damaged(path, f"its contents are incomplete ({exc!r})") from None
    _check_same_experiment(run_dir, metadata.get("config"), config_toml, round_number)
    try:
        state = _server_state(round_number, tensors, device)
        rng = _rng_state(tensors, json.loads(metadata["rng"]))
        metrics = MetricsPosition(int(metadata["metrics-size"]), metadata["metrics-digest"])
        elapsed = float(metadata["elapsed"])
    except (KeyError, ValueError, TypeError) as exc:
        raise _damaged(path, f"its contents are incomplete ({exc!r})") from None
    return Checkpoint(state, metrics, elapsed, rng)


def _check_same_experiment(run_dir: Path, written: str | None, config_toml: str, round_number: int) -> None:
    """Refuse `config_toml` unless it is the config the checkpoint of round `round_number` was
    written with: the same text, or the same once read by this version (a checkpoint from an older
    koala lacks the settings added since, which take their defaults, and those reproduce the older
    behaviour), in every setting but the round count, which may change while nothing depends on it."""
    if written is not None and written == config_toml:
        return
    try:
        then = config_from_toml(written or "", "the checkpoint's config")
        now = config_from_toml(config_toml, "the run's config")
    except ConfigError:
        then = now = None
    if then is None or now is None or then.model_copy(update={"rounds": now.rounds}) != now:
        raise CheckpointError(
            f"{run_dir / CONFIG_FILE} differs from the config {run_dir / CHECKPOINT_FILE} was written with: a resumed "
            "run must keep its config (only its rounds may change: koala run --resume RUN_DIR --rounds N). Undo the "
            "edit, or start a new run with the new config (--out NEW_DIR)"
        )
    if now.rounds < round_number:
        raise CheckpointError(
            f"{run_dir} has run {round_number} rounds: it cannot be cut to {now.rounds}. Continue it to "
            f"{round_number} rounds or more, or read its first {now.rounds} rounds from its metrics.jsonl"
        )
    if now.privacy.target_epsilon and now.rounds != then.rounds:
        raise CheckpointError(
            f"{run_dir} solved its noise for privacy.target-epsilon = {now.privacy.target_epsilon} after "
            f"{then.rounds} rounds: at {now.rounds} rounds it would spend a different budget. Start a new run: "
            f"koala run {run_dir / CONFIG_FILE} --set rounds={now.rounds} --out NEW_DIR"
        )


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a checkpoint file, after checking its format and digest."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(path, f"it cannot be read as safetensors ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise _damaged(path, f"it is not a koala-fl checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    expected = metadata.pop("digest", None)
    if expected != _digest(tensors, metadata):
        raise _damaged(path, "its digest does not match its contents")
    return tensors, metadata


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is damaged: {why}. It is left as it is and nothing was resumed; restore the file "
        "from a backup, or start the run again with its config.toml and a new --out"
    )


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """BLAKE2b over the metadata and every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.blake2b(json.dumps(metadata, sort_keys=True).encode(), digest_size=32)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensors[name].dtype}|{tuple(tensors[name].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def _state_tensors(state: ServerState) -> dict[str, torch.Tensor]:
    tensors = {} if state.large is None else {_LARGE + name: t for name, t in state.large.items()}
    for prefix, groups in ((_SMALL, state.small), (_OPTIMIZER, state.optimizers)):
        for key, weights in groups.items():
            tensors.update({f"{prefix}{key}/{name}": t for name, t in weights.items()})
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def _server_state(round_number: int, tensors: dict[str, torch.Tensor], device: torch.device) -> ServerState:
    large: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, dict[str, torch.Tensor]]] = {_SMALL: {}, _OPTIMIZER: {}}
    for name, tensor in tensors.items():
        if name.startswith(_LARGE):
            large[name.removeprefix(_LARGE)] = tensor.to(device)
        for prefix, groups in grouped.items():
            if name.startswith(prefix):
                group, _, key = name.removeprefix(prefix).partition("/")
                groups.setdefault(group, {})[key] = tensor.to(device)
    return ServerState(round_number, large or None, grouped[_SMALL], grouped[_OPTIMIZER])


def _rng_tensors(rng: GlobalRngState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The generators' states as tensors (the long arrays) and JSON (the scalars)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = rng.numpy
    py_version, py_words, py_gauss = rng.python
    tensors = {
        _RNG + "torch-cpu": rng.torch_cpu,
        _RNG + "numpy-keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        _RNG + "python-words": torch.tensor(py_words, dtype=torch.int64),
    }
    tensors.update({f"{_RNG}torch-cuda/{i}": state for i, state in enumerate(rng.torch_cuda)})
    meta = {"numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)], "python": [py_version, py_gauss],
            "cuda-devices": len(rng.torch_cuda)}
    return tensors, meta


def _rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> GlobalRngState:
    np_kind, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    py_version, py_gauss = meta["python"]
    return GlobalRngState(
        torch_cpu=tensors[_RNG + "torch-cpu"],
        torch_cuda=[tensors[f"{_RNG}torch-cuda/{i}"] for i in range(meta["cuda-devices"])],
        numpy=(np_kind, tensors[_RNG + "numpy-keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss),
        python=(py_version, tuple(tensors[_RNG + "python-words"].tolist()), py_gauss),
    )
