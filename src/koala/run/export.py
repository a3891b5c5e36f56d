"""Taking a run's model to a device (`koala export`): the large model or a small one, as ONNX for an
inference runtime, verified with onnxruntime against PyTorch on the run's own test images, or as
bare safetensors weights.

The exported network expects what the run trained on: float32 images (N, C, H, W), any N, whose
pixels are scaled to [0, 1] and then standardised per channel with the data set's mean and
standard deviation; the file states them in its metadata (ONNX `metadata_props`, the safetensors
header), with the architecture, the class count and the round it comes from.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from koala.config import ExperimentConfig
from koala.data.dataset import ImageSplit
from koala.data.federated import make_federated_split
from koala.data.sources import load_source
from koala.errors import KoalaError
from koala.models import InputSpec
from koala.run.checkpoint import load_checkpoint
from koala.run.run_dir import CONFIG_FILE, read_metrics, read_run_config
from koala.state import StateDict
from koala.training import predict_logits
from koala.weights import instantiate

TOLERANCE = 1e-4
"""The largest difference allowed between the exported model's logits and PyTorch's."""


class ExportError(KoalaError):
    """An export that could not be made or did not verify; nothing is left at its destination."""


@dataclass(frozen=True)
class RunModel:
    """One model of a run as its last checkpoint holds it, with what a device needs to feed it."""

    name: str
    architecture: str
    state: StateDict
    config: ExperimentConfig
    spec: InputSpec
    test: ImageSplit
    mean: tuple[float, ...]
    std: tuple[float, ...]
    round: int
    recorded_accuracy: float | None
    """The test accuracy the run recorded for this model at `round` (None when it did not evaluate then)."""

    def module(self) -> nn.Module:
        """The model in eval mode, contiguous, on the CPU (what an exporter traces)."""
        return instantiate(self.architecture, self.spec, self.state, "cpu").to(memory_format=torch.contiguous_format).eval()

    def metadata(self) -> dict[str, str]:
        """What an exported file says about itself (strings: both formats store strings)."""
        size = self.spec.image_size
        return {
            "koala-fl.model": self.name, "koala-fl.architecture": self.architecture,
            "koala-fl.round": str(self.round), "koala-fl.dataset": self.config.data.dataset,
            "koala-fl.classes": str(self.spec.num_classes),
            "koala-fl.input": f"float32 images (N, {self.spec.channels}, {size}, {size}); N is free",
            "koala-fl.normalisation": json.dumps({"pixels": "divided by 255", "mean": self.mean, "std": self.std}),
            "koala-fl.output": f"logits (N, {self.spec.num_classes}); the class is their argmax",
        }


def load_run_model(run_dir: Path, name: str) -> RunModel:
    """`name` ("large" or "small:ARCH") of the run in `run_dir`, from its last checkpoint, with the
    run's test split rebuilt from its config."""
    config = read_run_config(run_dir)
    state = load_checkpoint(run_dir, (run_dir / CONFIG_FILE).read_text(), torch.device("cpu")).state
    available = (["large"] if state.large is not None else []) + [f"small:{arch}" for arch in state.small]
    if name not in available:
        raise ExportError(f"{run_dir} has no model {name!r}: choose one of {', '.join(available)} (--model)")
    source = load_source(config.data.dataset, Path(config.data.dir).expanduser() if config.data.dir else None)
    split = make_federated_split(source, config.data, config.seed)
    architecture = config.models.large if name == "large" else name.removeprefix("small:")
    weights = state.large if name == "large" else state.small[architecture]
    recorded = next((line["eval"][name]["accuracy"] for line in read_metrics(run_dir)
                     if line["round"] == state.round and name in line.get("eval", {})), None)
    return RunModel(name, architecture, weights, config, split.input_spec, split.test, source.mean, source.std,
                    state.round, recorded)


@dataclass(frozen=True)
class Verification:
    """How the exported model compares with PyTorch on the run's test images."""

    images: int
    max_difference: float
    exported_accuracy: float
    pytorch_accuracy: float
    recorded_accuracy: float | None


def export_onnx(model: RunModel, out: Path) -> Verification:
    """Write `model` to `out` as ONNX (dynamic batch dimension, `metadata_props` as in
    `RunModel.metadata`) with torch.onnx's exporter, then run it with onnxruntime on every test
    image: its logits must equal PyTorch's within `TOLERANCE`, else nothing is written."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ExportError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'koala-fl[export]'") from None
    module = model.module()
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as scratch:
        traced = Path(scratch) / "model.onnx"
        with _exporter_quiet():
            program = torch.onnx.export(module, (model.test.images[:2],), dynamo=True, dynamic_shapes=({0: batch},),
                                        input_names=["images"], output_names=["logits"], verbose=False)
        program.save(str(traced))
        graph = onnx.load(str(traced))
        for key, value in model.metadata().items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(traced))
        session = onnxruntime.InferenceSession(str(traced), providers=["CPUExecutionProvider"])
        verification = _verify(model, module, lambda images: torch.from_numpy(
            session.run(None, {"images": images.numpy()})[0]))
        if verification.max_difference > TOLERANCE:
            raise ExportError(f"the ONNX model's logits differ from PyTorch's by up to {verification.max_difference:.3g} "
                              f"(more than {TOLERANCE:g}) on the test images: nothing was written to {out}")
        _move(traced, out)
    return verification


@contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter's own chatter (that torchvision's operators are skipped, deprecation notices) is
    not the user's concern: it is silenced while it runs; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _verify(model: RunModel, module: nn.Module, exported) -> Verification:
    images, labels = model.test.images, model.test.labels
    reference = predict_logits(module, images)
    outputs = torch.cat([exported(images[i : i + 512]) for i in range(0, len(images), 512)])
    return Verification(
        images=len(images),
        max_difference=float((outputs - reference).abs().max()),
        exported_accuracy=float((outputs.argmax(1) == labels).float().mean()),
        pytorch_accuracy=float((reference.argmax(1) == labels).float().mean()),
        recorded_accuracy=model.recorded_accuracy,
    )


def export_safetensors(model: RunModel, out: Path) -> None:
    """Write the model's bare weights (contiguous, by name) to `out`, with `RunModel.metadata` in the header."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in model.state.items()}, str(path), metadata=model.metadata())
        _move(path, out)


def _move(source: Path, out: Path) -> None:
    """Put the finished file at `out` (made complete elsewhere first, so `out` is never half-written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_bytes(source.read_bytes())
    os.replace(temporary, out)
