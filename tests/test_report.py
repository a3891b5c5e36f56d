"""`koala report` on real runs and `koala resources`: tables, plots that open as images, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from helpers import DIGITS as DIGITS_DATA  # noqa: E402

from koala.cli import main
from koala.config import load_config
from koala.report import PLOTS, TABLE_HEADER, load_run
from koala.run.launch import run_local

DIGITS = [*DIGITS_DATA, "data.num-clients=4", "models.large='lenet'", "models.small=['lenet']", "client.lr=0.05"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real runs of different lengths: KOALA for 2 rounds, FedAvg-small for 3."""
    root = tmp_path_factory.mktemp("runs")
    run_local(load_config(None, [*DIGITS, "rounds=2"]), root / "koala", echo=lambda _: None)
    run_local(load_config(None, [*DIGITS, "rounds=3", "algorithm='fedavg-small'"]), root / "fedavg-small", echo=lambda _: None)
    return [root / "koala", root / "fedavg-small"]


def _rows(report: str) -> dict[str, list[str]]:
    lines = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_report_writes_a_table_and_plots(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    rows = _rows(report)
    assert set(rows) == {"koala", "fedavg-small"}
    assert all(len(row) == len(TABLE_HEADER) for row in rows.values())
    koala, fedavg = rows["koala"], rows["fedavg-small"]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert koala[1:4] == ["koala", "homogeneous", "2"] and fedavg[1:4] == ["fedavg-small", "homogeneous", "3"]
    assert koala[4] == f"{100 * summary['final']['large']['accuracy']:.2f}"
    assert koala[5] == f"{100 * summary['best-accuracy']['large']:.2f}"  # over rounds 1 and 2, as the summary's
    rounds = [a for r, a in load_run(runs[0]).accuracy("large") if r > 0]
    assert summary["best-accuracy"]["large"] == max(rounds)
    assert fedavg[4] == fedavg[5] == "–"  # no large model in FedAvg-small
    lenet = json.loads((runs[0] / "resources.json").read_text())["architectures"]["lenet"]
    assert koala[7] == f"lenet {lenet['parameters']:,}"
    flops = [line["resources"]["client-flops"] for line in load_run(runs[0]).metrics[1:]]
    assert koala[8] == f"{sum(flops) / len(flops) / 1e6:.3g} MFLOP"
    assert koala[9] == f"{4 * 2 * lenet['state-bytes'] / 1e3:.3g} kB"  # 4 clients, each down and up
    assert "| koala |" in capsys.readouterr().out
    for name in PLOTS:
        assert f"]({name})" in report
        image = matplotlib.image.imread(out / name)
        assert image.shape[:2] == (500, 800)  # 8 x 5 inches at 100 dpi
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_report_handles_runs_without_accounting_or_summary(runs: list[Path], tmp_path: Path) -> None:
    old = tmp_path / "old-run"
    old.mkdir()
    lines = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    stripped = [{k: v for k, v in line.items() if k != "resources"} for line in lines]
    (old / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in stripped) + "\n")
    run = load_run(old)
    assert run.summary is None and run.resources is None
    assert main(["report", str(old), str(runs[1]), "--out", str(tmp_path / "r")]) == 0
    row = _rows((tmp_path / "r" / "report.md").read_text())["old-run"]
    assert row[7:10] == ["–", "–", "–"]
    assert row[10].endswith("(rounds only)")
    assert all((tmp_path / "r" / name).is_file() for name in PLOTS)


def test_report_on_a_run_that_has_written_nothing_yet(runs: list[Path], tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text("")
    assert main(["report", str(fresh), str(runs[0]), "--out", str(tmp_path / "r")]) == 0
    row = _rows((tmp_path / "r" / "report.md").read_text())["fresh"]
    assert row[3] == "0" and row[4:10] == ["–"] * 6


def test_report_on_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory: metrics.jsonl is missing" in err and "Traceback" not in err


def test_resources_prints_the_paper_check(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["resources", "--large", "vgg19-imagenet", "--small", "mobilenetv2-imagenet,shufflenetv2-1.5-imagenet",
            "--input", "3,224,224", "--classes", "1000"]
    assert main(args) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["vgg19-imagenet"][1] == "143,667,240" and rows["mobilenetv2-imagenet"][1] == "3,504,872"
    assert rows["shufflenetv2-1.5-imagenet"][1] == "3,503,624"
    for small in ("mobilenetv2-imagenet", "shufflenetv2-1.5-imagenet"):  # the paper's two ~3.5 M-parameter clients
        storage, flops = float(rows[small][6]), float(rows[small][7])
        assert 97.2 <= storage <= 97.6 and 98.4 <= flops <= 98.6  # the paper's ranges


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "3,224,200"], "the models take square images"),
        (["--input", "three"], "expected C,H,W"),
        (["--small", "mobilenet-v2"], "unknown model 'mobilenet-v2'"),
        (["--classes", "1"], "at least 2 classes"),
        (["--batch-size", "1"], "a training step needs at least 2 examples"),
    ],
)
def test_resources_rejects_bad_input(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--large": "resnet18-ds", "--small": "lenet", "--input": "1,28,28", "--classes": "10"}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main(["resources", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
