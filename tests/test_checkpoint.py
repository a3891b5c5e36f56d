"""Checkpoints and resume: a killed run continues bit-identically; damaged checkpoints are refused."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from helpers import BASE
from helpers import DIGITS as DIGITS_DATA
from interruption import interrupt_run

from koala.cli import main
from koala.config import config_to_toml, load_config
from koala.errors import CheckpointError
from koala.run.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from koala.run.experiment import prepare_experiment
from koala.run.launch import run_local
from koala.run.run_dir import (
    CONFIG_FILE,
    METRICS_FILE,
    RESOURCES_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    MetricsPosition,
    RunDirectory,
    read_metrics,
    without_times,
)
from koala.seeding import GlobalRngState
from koala.state import ServerState

DIGITS = [*DIGITS_DATA, "client.lr=0.05", "threads=1"]
# Heterogeneous, with MobileNetV2 (it has dropout layers) and a ResNet-18 server model: every part of
# the server state and every random stream is exercised, and a round lasts about 2 s.
KILLED_RUN = DIGITS + ["data.num-clients=4", "models.large='resnet18-ds'", "models.small=['lenet','mobilenetv2']",
                       "rounds=4", "client.dropout-probability=0.2"]
# The server keeps its momentum across rounds here, so a resumed run must restore it too.
SMALL_RUN = DIGITS + ["data.num-clients=4", "models.large='lenet'", "models.small=['lenet']", "rounds=3",
                      "distill.keep-optimizer-state=true"]


def _quiet(_: str) -> None:
    pass


def _status(run: Path) -> dict:
    return json.loads((run / STATUS_FILE).read_text())


def _without_wall_time(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall-time"}


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.stderr.read() if process.stderr else "the run ended early"
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} lines in {timeout} s")


@pytest.mark.integration
def test_a_run_killed_mid_round_resumes_bit_identically(tmp_path: Path) -> None:
    config = load_config(BASE, KILLED_RUN)
    experiment_file = tmp_path / "experiment.toml"
    experiment_file.write_text(config_to_toml(config))
    reference = run_local(config, tmp_path / "reference", echo=_quiet)

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "koala.cli", "run"]
    process = subprocess.Popen([*command, str(experiment_file), "--out", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(run / METRICS_FILE, 2, process)  # rounds 0 and 1 are done: round 2 is under way
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (run / SUMMARY_FILE).exists() and _status(run)["status"] == "running"
    assert 2 <= len(read_metrics(run)) <= config.rounds

    resumed = subprocess.run([*command, "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after round" in resumed.stdout
    assert without_times(read_metrics(run)) == without_times(reference.metrics)
    assert any("unreachable" in f["reason"] for line in reference.metrics for f in line.get("failed", []))
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert _without_wall_time(summary) == _without_wall_time(reference.summary)
    assert (run / RESOURCES_FILE).read_text() == (reference.run_dir / RESOURCES_FILE).read_text()
    assert _status(run) == {"status": "complete", "rounds": config.rounds}
    assert not list(run.glob("*.tmp"))


def test_an_interrupted_run_is_marked_failed_and_resumes_without_stale_lines(tmp_path: Path) -> None:
    config = load_config(BASE, SMALL_RUN)
    reference = run_local(config, tmp_path / "reference", echo=_quiet)
    run = tmp_path / "run"
    interrupt_run(config, run, round_number=3)
    status = _status(run)
    assert status["status"] == "failed" and status["error"].startswith("KeyboardInterrupt")
    assert status["resume"] == f"koala run --resume {run}"
    # A line appended after the last checkpoint (a kill between the two writes) must not survive.
    with (run / METRICS_FILE).open("a") as handle:
        handle.write('{"round": 3, "half-written": true}\n')
    printed: list[str] = []
    run_local(config, run, echo=printed.append, resume=True)
    assert f"resuming {run} after round 2 of 3" in printed
    assert without_times(read_metrics(run)) == without_times(reference.metrics)
    assert _status(run)["status"] == "complete"


def test_a_crash_between_a_metrics_line_and_its_checkpoint_is_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The deterministic version of the worst kill point: round 2's line is on disk, its checkpoint is not.
    import koala.run.loop as rounds

    config = load_config(BASE, SMALL_RUN)
    reference = run_local(config, tmp_path / "reference", echo=_quiet)
    real_save = rounds.save_checkpoint

    def save_fails_in_round_2(run_dir, checkpoint, config_toml):
        if checkpoint.state.round == 2:
            raise OSError(28, "No space left on device")
        return real_save(run_dir, checkpoint, config_toml)

    monkeypatch.setattr(rounds, "save_checkpoint", save_fails_in_round_2)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        run_local(config, run, echo=_quiet)
    assert [line["round"] for line in read_metrics(run)] == [0, 1, 2]
    assert _status(run)["status"] == "failed" and "No space left on device" in _status(run)["error"]
    monkeypatch.setattr(rounds, "save_checkpoint", real_save)
    run_local(config, run, echo=_quiet, resume=True)
    assert without_times(read_metrics(run)) == without_times(reference.metrics)


def test_resuming_a_finished_run_changes_no_metrics(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / METRICS_FILE).read_bytes()
    printed: list[str] = []
    run_local(load_config(run / CONFIG_FILE), run, echo=printed.append, resume=True)
    assert (run / METRICS_FILE).read_bytes() == before
    assert f"resuming {run} after round 2 of 2" in printed


def test_checkpoint_round_trips_the_state_the_metrics_position_and_every_generator(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    state = ServerState(
        round=7,
        large={"conv.weight": torch.randn(4, 3, generator=generator), "bn.num_batches_tracked": torch.tensor(12)},
        small={"shufflenetv2-0.5": {"fc.bias": torch.randn(5, generator=generator)},
               "lenet": {"fc.weight": torch.randn(2, 2, generator=generator).half()}},
        optimizers={"reverse": {"conv.weight": torch.randn(4, 3, generator=generator)},
                    "forward:shufflenetv2-0.5": {"fc.bias": torch.randn(5, generator=generator)}},
    )
    position = MetricsPosition(1234, "ab" * 32)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    rng = GlobalRngState.capture()
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint(tmp_path, Checkpoint(state, position, 12.5, rng), "name = 'x'\n")
    assert not list(tmp_path.glob("*.tmp"))

    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    loaded = load_checkpoint(tmp_path, "name = 'x'\n", torch.device("cpu"))
    loaded.rng.restore()
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.rand(3), expected_draws[1]) and random.random() == expected_draws[2]
    assert loaded.state.round == 7 and loaded.elapsed == 12.5 and loaded.metrics_position == position
    assert loaded.state.small.keys() == state.small.keys() and loaded.state.optimizers.keys() == state.optimizers.keys()
    pairs = [(state.large, loaded.state.large), *((state.small[a], loaded.state.small[a]) for a in state.small),
             *((state.optimizers[r], loaded.state.optimizers[r]) for r in state.optimizers)]
    for original, restored in pairs:
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)


def test_a_run_without_a_large_model_checkpoints_none(tmp_path: Path) -> None:
    state = ServerState(round=1, large=None, small={"lenet": {"w": torch.ones(2)}})
    save_checkpoint(tmp_path, Checkpoint(state, MetricsPosition(0, ""), 0.0, GlobalRngState.capture()), "")
    assert load_checkpoint(tmp_path, "", torch.device("cpu")).state.large is None


def test_a_checkpoint_from_an_older_koala_resumes_when_its_config_only_lacks_settings_added_since(tmp_path: Path) -> None:
    config_toml = config_to_toml(load_config(BASE, SMALL_RUN))
    older = tomllib.loads(config_toml)
    del older["privacy"], older["client"]["sampling"]  # what an older version wrote: no such settings yet
    state = ServerState(round=1, large=None, small={"lenet": {"w": torch.ones(2)}})
    save_checkpoint(tmp_path, Checkpoint(state, MetricsPosition(0, ""), 0.0, GlobalRngState.capture()), tomli_w.dumps(older))
    assert load_checkpoint(tmp_path, config_toml, torch.device("cpu")).state.round == 1
    changed = config_to_toml(load_config(BASE, [*SMALL_RUN, "client.lr=0.5"]))
    with pytest.raises(CheckpointError, match="differs from the config"):
        load_checkpoint(tmp_path, changed, torch.device("cpu"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    run_local(load_config(BASE, SMALL_RUN + ["rounds=2"]), run, echo=_quiet)
    return run


def _truncate(run: Path) -> None:
    path = run / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight_byte(run: Path) -> None:
    content = bytearray((run / CHECKPOINT_FILE).read_bytes())
    content[-100] ^= 0xFF
    (run / CHECKPOINT_FILE).write_bytes(bytes(content))


def _edit_config(run: Path) -> None:
    config = run / CONFIG_FILE
    config.write_text(config.read_text().replace("seed = 0", "seed = 1"))


def _edit_metrics(run: Path) -> None:
    metrics = run / METRICS_FILE
    metrics.write_text(metrics.read_text().replace('"round": 1', '"round": 9'))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "is damaged: it cannot be read as safetensors"),
        (_flip_a_weight_byte, "is damaged: its digest does not match its contents"),
        (lambda run: (run / CHECKPOINT_FILE).write_bytes(b"\x00" * 64), "is damaged: it cannot be read"),
        (lambda run: (run / CHECKPOINT_FILE).unlink(), "has no checkpoint.safetensors"),
        (_edit_config, "differs from the config"),
        (_edit_metrics, "metrics.jsonl differs from what the checkpoint recorded"),
        (lambda run: (run / METRICS_FILE).write_text(""), "metrics.jsonl differs from what the checkpoint recorded"),
    ],
    ids=["truncated", "flipped-byte", "garbage", "missing", "config-edited", "metrics-edited", "metrics-emptied"],
)
def test_a_damaged_checkpoint_is_refused_and_nothing_is_lost(
    finished_run: Path, tmp_path: Path, damage, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    assert main(["run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("koala: error:") and message in err and "Traceback" not in err
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


def _raise_rounds_in_config(run: Path) -> list[str]:
    config = run / CONFIG_FILE
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 3"))
    return []


@pytest.mark.parametrize("how", [lambda run: ["--rounds", "3"], _raise_rounds_in_config], ids=["--rounds", "config-edited"])
def test_a_finished_run_continued_to_more_rounds_is_the_run_started_with_them(
    finished_run: Path, tmp_path: Path, how, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = run_local(load_config(BASE, SMALL_RUN), tmp_path / "reference", echo=_quiet)  # 3 rounds
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)  # the same run, ended after 2
    assert main(["run", "--resume", str(run), *how(run)]) == 0
    assert f"resuming {run} after round 2 of 3" in capsys.readouterr().out
    assert without_times(read_metrics(run)) == without_times(reference.metrics)
    assert _without_wall_time(json.loads((run / SUMMARY_FILE).read_text())) == _without_wall_time(reference.summary)
    assert (run / CONFIG_FILE).read_text() == (reference.run_dir / CONFIG_FILE).read_text()
    assert _status(run) == {"status": "complete", "rounds": 3}


def test_a_run_continued_past_its_end_is_unfinished_until_it_gets_there(finished_run: Path, tmp_path: Path) -> None:
    # a continuation stopped before its first new round must not pass for finished: its summary is the shorter run's
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    RunDirectory.reopen(run).continue_with(load_config(BASE, SMALL_RUN), from_round=2)
    assert not (run / SUMMARY_FILE).exists() and not (run / RESOURCES_FILE).exists()
    assert load_config(run / CONFIG_FILE).rounds == 3
    assert load_checkpoint(run, config_to_toml(load_config(BASE, SMALL_RUN)), torch.device("cpu")).state.round == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume", "{run}", "--rounds", "1"], "has run 2 rounds: it cannot be cut to 1"),
        (["--resume", "{run}", "--rounds", "0"], "--rounds 0: a run has at least 1 round"),
        (["{quickstart}", "--rounds", "3"], "a new run takes --set rounds=N"),
    ],
    ids=["fewer-rounds", "zero-rounds", "without-resume"],
)
def test_rounds_that_cannot_continue_a_run_are_refused_and_nothing_is_lost(
    finished_run: Path, tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    assert main(["run", *(a.format(run=run, quickstart=BASE) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("koala: error:") and message in err and "Traceback" not in err
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


def test_a_run_whose_noise_was_solved_for_its_rounds_cannot_change_them(tmp_path: Path) -> None:
    private = [*SMALL_RUN, "client.max-update-norm=1.0", "privacy.target-epsilon=4.0"]
    state = ServerState(round=2, large=None, small={"lenet": {"w": torch.ones(2)}})
    written = config_to_toml(load_config(BASE, [*private, "rounds=2"]))
    save_checkpoint(tmp_path, Checkpoint(state, MetricsPosition(0, ""), 0.0, GlobalRngState.capture()), written)
    assert load_checkpoint(tmp_path, written, torch.device("cpu")).state.round == 2
    with pytest.raises(CheckpointError, match="solved its noise for privacy.target-epsilon = 4.0 after 2 rounds"):
        load_checkpoint(tmp_path, config_to_toml(load_config(BASE, [*private, "rounds=3"])), torch.device("cpu"))


def test_load_checkpoint_refuses_a_foreign_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / CHECKPOINT_FILE), metadata={"format": "something else"})
    with pytest.raises(CheckpointError, match="it is not a koala-fl checkpoint"):
        load_checkpoint(tmp_path, "", torch.device("cpu"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume", "{tmp}/absent"], "no such directory"),
        (["--resume", "{tmp}"], "is not a koala run directory"),
        (["{quickstart}", "--resume", "{tmp}"], "give no CONFIG, --set or --out with it"),
        ([], "needs an experiment file"),
    ],
)
def test_resume_arguments_are_checked(tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    filled = [a.format(tmp=tmp_path, quickstart=BASE) for a in args]
    assert main(["run", *filled]) == 2
    assert message in capsys.readouterr().err


def test_training_with_dropout_is_a_pure_function_that_leaves_the_global_generator_alone() -> None:
    # MobileNetV2 has a dropout layer: its randomness comes from the training seed, not from torch's
    # global generator, so a client's update is the same whatever ran before it in the process.
    from koala.algorithms.client import local_train
    from koala.state import ClientTask
    from koala.weights import initial_state

    experiment = prepare_experiment(load_config(BASE, DIGITS + ["data.num-clients=4", "models.small=['mobilenetv2']",
                                                                      "client.batch-size=128"]))
    weights = initial_state("mobilenetv2", experiment.spec, 0)
    task, data = ClientTask(0, "mobilenetv2", weights), experiment.split.client_data(0)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = local_train(task, data, experiment.config, experiment.spec, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    second = local_train(task, data, experiment.config, experiment.spec, seed=5)
    other_seed = local_train(task, data, experiment.config, experiment.spec, seed=6)
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    assert not all(torch.equal(first.state[k], other_seed.state[k]) for k in first.state)
