"""End-to-end runs of the local engine on real Fashion-MNIST (a subset) and on digits."""

import re
from pathlib import Path
from typing import Any

import pytest

from koala.config import load_config
from koala.errors import ConfigError, DataError, ModelError
from koala.run.launch import run_local
from koala.run.run_dir import read_metrics, without_times

# A small Fashion-MNIST federation: 3,000 training images, 6 clients, 1,000 test images.
FMNIST_SMALL = [
    "data.train-limit=3000", "data.test-limit=1000", "data.num-clients=6", "data.proxy-fraction=0.2",
    "data.min-client-size=50", "client.epochs=2", "client.lr=0.05", "distill.reverse.epochs=3",
    "distill.reverse.lr=0.05", "distill.forward.lr=0.05", "models.large='resnet18-ds'",
    "rounds=4", "threads=2",
]


def _run(tmp_path: Path, overrides: list[str], name: str = "run") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    result = run_local(load_config(None, overrides), tmp_path / name, echo=lambda _: None)
    return result.metrics, result.summary


def _accuracies(metrics: list[dict[str, Any]], model: str) -> list[float]:
    return [line["eval"][model]["accuracy"] for line in metrics if "eval" in line]


@pytest.mark.integration
def test_koala_homogeneous_lifts_the_large_model(tmp_path: Path) -> None:
    metrics, summary = _run(tmp_path, FMNIST_SMALL + ["models.small=['lenet']"])
    large = _accuracies(metrics, "large")
    assert large[0] < 0.2  # random start: chance level
    assert large[-1] > 0.5 and large[-1] > large[0] + 0.35
    assert _accuracies(metrics, "small:lenet")[-1] > 0.5
    assert summary["mode"] == "homogeneous" and summary["rounds"] == 4
    # (the reverse and forward losses themselves are pinned by tests/test_recorded_values.py)
    assert read_metrics(tmp_path / "run") == metrics
    assert (tmp_path / "run" / "config.toml").is_file() and (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.integration
def test_koala_heterogeneous_fuses_two_architectures(tmp_path: Path) -> None:
    overrides = FMNIST_SMALL + ["models.small=['lenet','mobilenetv3-small']", "models.small-shares=[0.5,0.5]"]
    metrics, summary = _run(tmp_path, overrides)
    assert summary["mode"] == "heterogeneous" and summary["small"] == {"lenet": 3, "mobilenetv3-small": 3}
    large = _accuracies(metrics, "large")
    assert large[-1] > 0.45 and large[-1] > large[0] + 0.3
    assert {"forward-loss:lenet", "forward-loss:mobilenetv3-small"} <= set(metrics[-1])


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    overrides = ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "models.small=['lenet']",
                 "rounds=2", "data.min-client-size=20", "distill.reverse.batch-size=32", "distill.forward.batch-size=32"]
    first, _ = _run(tmp_path, overrides, "a")
    second, _ = _run(tmp_path, overrides, "b")
    third, _ = _run(tmp_path, overrides + ["seed=1"], "c")
    assert without_times(first) == without_times(second)
    assert without_times(first) != without_times(third)


@pytest.mark.parametrize("algorithm", ["fedavg-large", "fedavg-small"])
def test_fedavg_baselines_learn(tmp_path: Path, algorithm: str) -> None:
    overrides = ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "models.small=['lenet']",
                 "rounds=3", "client.epochs=3", "client.lr=0.05", "client.batch-size=32", f"algorithm='{algorithm}'"]
    metrics, _ = _run(tmp_path, overrides)
    model = "large" if algorithm == "fedavg-large" else "small:lenet"
    assert list(metrics[-1]["eval"]) == [model]
    accuracy = _accuracies(metrics, model)
    assert accuracy[-1] > 0.8 and accuracy[-1] > accuracy[0] + 0.5


def test_partial_participation_samples_the_configured_share(tmp_path: Path) -> None:
    overrides = ["data.dataset='digits'", "data.num-clients=10", "client.participation=0.3", "models.large='lenet'",
                 "models.small=['lenet']", "rounds=2", "eval-every=2", "data.min-client-size=5"]
    metrics, _ = _run(tmp_path, overrides)
    assert [line["clients"] for line in metrics[1:]] == [3, 3]
    assert "eval" not in metrics[1] and "eval" in metrics[2]


def test_pretrained_large_start_is_better_than_random(tmp_path: Path) -> None:
    base = ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "models.small=['lenet']",
            "rounds=1", "data.proxy-fraction=0.3", "data.proxy-labelled=300"]
    random_start, _ = _run(tmp_path, base, "random")
    pretrained, _ = _run(tmp_path, base + ["large-init.kind='pretrain'", "large-init.pretrain.epochs=20"], "pre")
    assert _accuracies(pretrained, "large")[0] > 0.7 > _accuracies(random_start, "large")[0]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["models.large='resnet-18'"], ModelError, "unknown model 'resnet-18'. Did you mean 'resnet18'?"),
        (["models.small=['lenet5']"], ModelError, "unknown model 'lenet5'"),
        (["data.dir='/nonexistent/fmnist'"], DataError, "/nonexistent/fmnist"),
        (["data.dataset='digits'", "data.num-clients=2000"], DataError, "for 2000 clients"),
        (["distill.fusion='vote'"], ConfigError, "unknown fusion rule 'vote'"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path: Path, overrides: list[str], error: type, message: str) -> None:
    with pytest.raises(error) as info:
        _run(tmp_path, overrides)
    assert message in str(info.value)
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already exists"):
        _run(tmp_path, ["data.dataset='digits'", "data.num-clients=2", "models.large='lenet'"])
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def test_a_round_without_enough_valid_updates_leaves_the_server_unchanged(tmp_path: Path) -> None:
    # A learning rate this large drives every client's weights to Inf/NaN: each update is rejected.
    overrides = ["data.dataset='digits'", "data.num-clients=3", "models.large='lenet'", "models.small=['lenet']",
                 "data.min-client-size=20", "rounds=1", "client.lr=1e30", "client.momentum=0"]
    metrics, _ = _run(tmp_path, overrides)
    line = metrics[1]
    assert line["accepted"] == 0 and len(line["rejected"]) == 3
    assert all("NaN or Inf" in r["reason"] for r in line["rejected"])
    assert "fewer than client.min-replies = 1" in line["skipped"]
    assert line["eval"] == metrics[0]["eval"]  # the server's models are exactly as before the round
    assert "reverse-loss" not in line and line["resources"]["server-flops"] == 0


def test_every_round_prints_the_elapsed_time_and_an_estimate_of_the_time_left(tmp_path: Path) -> None:
    lines: list[str] = []
    overrides = ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "rounds=3",
                 "data.min-client-size=20", "distill.reverse.batch-size=32", "distill.forward.batch-size=32"]
    run_local(load_config(None, overrides), tmp_path / "run", echo=lines.append)
    rounds = [line for line in lines if line.startswith("round") and not line.startswith("round   0")]
    assert len(rounds) == 3
    assert all(re.search(r"elapsed \d+:\d\d:\d\d  about \d+:\d\d:\d\d left$", line) for line in rounds)
    assert rounds[-1].endswith("about 0:00:00 left")


def test_the_time_left_is_the_median_recent_round_time_per_round_left() -> None:
    from koala.run.progress import estimate_time_left, format_progress

    assert estimate_time_left([100.0, 2.0, 3.0, 4.0, 5.0, 6.0], 10) == 40.0  # the first (slow) round has aged out
    assert estimate_time_left([], 5) == 0.0
    line = {"round": 3, "eval": {"large": {"accuracy": 0.5}}, "accepted": 4, "clients": 4, "train-loss": 0.5,
            "time-round": 1.0}
    assert format_progress(line, 10, elapsed=3725.4, left=61).endswith("elapsed 1:02:05  about 0:01:01 left")


def test_validation_split_is_evaluated_every_round_beside_the_test_split(tmp_path: Path) -> None:
    overrides = ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "models.small=['lenet']",
                 "rounds=2", "data.min-client-size=20", "data.validation-size=300"]
    metrics, summary = _run(tmp_path, overrides)
    # the start has no averaged model yet; every round after it evaluates the round's one, on both splits
    assert set(metrics[0]["eval-validation"]) == {"large", "small:lenet"}
    assert all(set(line[key]) == {"large", "small:lenet", "averaged:lenet"} for line in metrics[1:] for key in ("eval", "eval-validation"))
    assert metrics[-1]["eval-validation"] != metrics[-1]["eval"]  # 300 validation images, not the test split
    assert summary["validation"]["final"] == metrics[-1]["eval-validation"]
    assert summary["split"]["validation"] == 300
    # without the key, the metrics carry no validation entry
    plain, plain_summary = _run(tmp_path, overrides[:-1], "plain")
    assert "eval-validation" not in plain[0] and "validation" not in plain_summary


def test_run_directory_records_the_code_and_environment_that_produced_it(tmp_path: Path) -> None:
    import json
    import subprocess

    import torch

    _run(tmp_path, ["data.dataset='digits'", "data.num-clients=4", "models.large='lenet'", "models.small=['lenet']",
                    "rounds=1", "data.min-client-size=20", "threads=1"])
    sessions = json.loads((tmp_path / "run" / "environment.json").read_text())["sessions"]
    assert len(sessions) == 1
    session = sessions[0]
    assert session["torch"] == torch.__version__ and session["threads"] == 1 and session["engine"] == "local"
    # the same seed gives other numbers where torch's kernels dispatch to another instruction set
    assert session["cpu-capability"] == torch.backends.cpu.get_cpu_capability() and session["cpu"]
    checkout = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one): the commit is HEAD's
        assert session["commit"] == head.stdout.strip() and isinstance(session["dirty"], bool)


def test_the_best_accuracy_is_over_the_rounds_never_the_start() -> None:
    from koala.run.loop import summarise

    # a FedAvg-large run that fell under its pretrained start (78.25 -> 34.05): its best is a round's
    history = [{"round": r, "eval": {"large": {"accuracy": a}}} for r, a in enumerate([0.7825, 0.4, 0.3405])]
    totals = {"totals": {}, "reductions-vs-fedavg-large": {}}
    summary = summarise(history, {}, 1.0, totals)
    assert summary["start"]["large"]["accuracy"] == 0.7825 and summary["best-accuracy"]["large"] == 0.4
    # a model evaluated in some rounds only (KOALA's averaged one; the last round here was skipped): its best of those
    for line, averaged in zip(history, [None, 0.5, None], strict=True):
        if averaged is not None:
            line["eval"]["averaged:lenet"] = {"accuracy": averaged}
    assert summarise(history, {}, 1.0, totals)["best-accuracy"] == {"large": 0.4, "averaged:lenet": 0.5}


def test_fedavg_large_is_homogeneous_whatever_small_models_its_config_lists(tmp_path: Path) -> None:
    overrides = ["data.dataset='digits'", "data.num-clients=3", "models.large='lenet'", "rounds=1", "data.min-client-size=20",
                 "algorithm='fedavg-large'", "models.small=['lenet','mobilenetv3-small','shufflenetv2-0.5']"]
    _, summary = _run(tmp_path, overrides)
    assert summary["mode"] == "homogeneous" and summary["small"] == {}
    _, koala = _run(tmp_path, [*overrides[:-2], "models.small=['lenet','mobilenetv3-small','shufflenetv2-0.5']"], "koala")
    assert koala["mode"] == "heterogeneous" and sum(koala["small"].values()) == 3


def test_the_last_accuracy_line_puts_each_models_start_beside_its_final_accuracy() -> None:
    from koala.run.progress import format_final

    summary = {"start": {"large": {"accuracy": 0.7882}, "small:lenet": {"accuracy": 0.1334}},
               "final": {"large": {"accuracy": 0.8331}, "small:lenet": {"accuracy": 0.8410}}}
    assert format_final(summary) == ("final: large 83.31% (start 78.82%, +4.49 points)  "
                                     "small:lenet 84.10% (start 13.34%, +70.76 points)")
