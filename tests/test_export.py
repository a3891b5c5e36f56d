"""`koala export`: a run's models as ONNX, verified with onnxruntime, and as bare safetensors weights."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
from helpers import BASE, DIGITS  # noqa: E402
from safetensors import safe_open  # noqa: E402

from koala.cli import main  # noqa: E402
from koala.config import load_config  # noqa: E402
from koala.data.dataset import ImageSplit  # noqa: E402
from koala.models import InputSpec, model_names  # noqa: E402
from koala.run.export import TOLERANCE, RunModel, export_onnx  # noqa: E402
from koala.run.launch import run_local  # noqa: E402
from koala.weights import initial_state  # noqa: E402

SPEC = InputSpec(1, 28, 10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    config = load_config(BASE, [*DIGITS, "data.num-clients=4", "models.large='resnet18-ds'", "rounds=1", "threads=1"])
    run_local(config, out, echo=lambda _: None)
    return out


@pytest.mark.parametrize("architecture", [*model_names("small"), "resnet18-ds"])
def test_every_small_model_and_the_large_one_round_trip_through_onnxruntime(architecture: str, tmp_path: Path) -> None:
    images = torch.randn(9, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = RunModel("small:" + architecture, architecture, initial_state(architecture, SPEC, 0), load_config(None), SPEC,
                     ImageSplit(images, torch.arange(9) % 10), (0.2860,), (0.3530,), 0, None)
    check = export_onnx(model, tmp_path / "model.onnx")
    assert check.images == 9 and check.max_difference <= TOLERANCE
    assert check.exported_accuracy == check.pytorch_accuracy


def test_export_of_a_runs_large_model_verifies_it_on_the_test_split(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "large.onnx"
    assert main(["export", str(run), "--model", "large", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    recorded = json.loads((run / "summary.json").read_text())["final"]["large"]["accuracy"]
    assert f"accuracy {100 * recorded:.2f}% (PyTorch {100 * recorded:.2f}%, the run recorded {100 * recorded:.2f}%)" in printed
    graph = onnx.load(str(out))
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert metadata["koala-fl.architecture"] == "resnet18-ds" and metadata["koala-fl.round"] == "1"
    assert json.loads(metadata["koala-fl.normalisation"])["mean"] == [0.3053]  # digits' mean, as the data loader used it
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is free
        assert session.run(None, {"images": torch.randn(batch, 1, 8, 8).numpy()})[0].shape == (batch, 10)


def test_export_of_bare_weights_as_safetensors(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lenet.safetensors"
    assert main(["export", str(run), "--model", "small:lenet", "--format", "safetensors", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["koala-fl.architecture"] == "lenet"
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    from koala.run.checkpoint import load_checkpoint

    state = load_checkpoint(run, (run / "config.toml").read_text(), torch.device("cpu")).state
    assert weights.keys() == state.small["lenet"].keys()
    assert all(torch.equal(weights[k], state.small["lenet"][k]) for k in weights)


def test_export_refuses_an_unknown_model_and_an_existing_file(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(run), "--model", "small:vgg11", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "has no model 'small:vgg11': choose one of large, small:lenet" in capsys.readouterr().err
    (tmp_path / "taken.onnx").write_text("keep me")
    assert main(["export", str(run), "--out", str(tmp_path / "taken.onnx")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken.onnx").read_text() == "keep me"
    assert not (tmp_path / "m.onnx").exists()
