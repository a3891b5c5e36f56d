"""The `koala` command: a real run, the model table, and clean error messages (no tracebacks)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BASE, cli_overrides
from helpers import DIGITS as DIGITS_DATA

from koala.cli import main

DIGITS = cli_overrides([*DIGITS_DATA, "data.num-clients=4", "models.large='lenet'", "rounds=2", "client.lr=0.05"])


def test_run_prints_a_line_per_round_and_where_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(BASE), *DIGITS, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out if line.startswith("round")] == ["0/2", "1/2", "2/2"]
    assert out[-1].startswith(f"wrote {tmp_path / 'run'}")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["algorithm"] == "koala"


def test_models_lists_every_model_with_its_parameter_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lenet" in out and "105,866" in out and "11,172,810" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.toml"], "config file missing.toml does not exist"),
        (["run", str(BASE), "--set", "data.alpah=0.1"], "data.alpah: unknown key. Did you mean 'alpha'?"),
        (["run", str(BASE), "--set", "models.large='resnet50'"], "unknown model 'resnet50'"),
        (["run", str(BASE), "--set", "data.dir='/nonexistent'"], "apt-get install -y dataset-fashion-mnist"),
    ],
)
def test_errors_are_one_clear_message(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("koala: error:") and message in err and "Traceback" not in err


def test_console_entry_point_reports_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = 'many'\n")
    result = subprocess.run([sys.executable, "-m", "koala.cli", "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "rounds: Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr
