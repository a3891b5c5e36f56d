"""Model state <-> module helpers shared by every algorithm: build, initialise, load weights, evaluate."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from koala.data.dataset import ImageSplit
from koala.errors import ModelError
from koala.models import InputSpec, build_model, model_entry
from koala.seeding import seeded_torch
from koala.state import StateDict
from koala.training import evaluate


def instantiate(architecture: str, spec: InputSpec, state: StateDict, device: torch.device | str) -> nn.Module:
    """A module of `architecture` holding a private copy of `state` on `device`.

    The module is built on the meta device, so no random initialisation is spent on weights that
    are overwritten at once, and laid out in the architecture's memory format.
    """
    with torch.device("meta"):
        model = build_model(architecture, spec)
    model.load_state_dict({k: v.to(device, copy=True) for k, v in state.items()}, assign=True)
    if model_entry(architecture).memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model


def module_state(model: nn.Module) -> StateDict:
    """The module's state dict, detached from autograd and contiguous (whatever layout the module
    trained in), on the CPU-or-device it lives on."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def initial_state(architecture: str, spec: InputSpec, seed: int) -> StateDict:
    """Fresh weights of `architecture`, drawn from the stream named after it."""
    with seeded_torch(seed, "init", architecture):
        return module_state(build_model(architecture, spec))


_NOT_A_STATE_DICT = (
    "{path} is not a plain state dict (a mapping of names to tensors) that koala-fl can read safely: it holds "
    "other Python objects, is damaged, or is not a torch file, and koala-fl never unpickles objects from a file. "
    "Convert it where it was made: from safetensors.torch import save_file; "
    "save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, 'weights.safetensors'), "
    "then set large-init.path to the .safetensors file"
)


def load_weights(path: Path, architecture: str, reference: StateDict) -> StateDict:
    """Weights from a .safetensors file or a torch state dict (loaded with weights_only=True),
    checked against the architecture's own tensor names and shapes."""
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist (large-init.path)")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"cannot read weights file {path} as safetensors: {exc}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch's own message advises unpickling: never ours to give
            raise ModelError(_NOT_A_STATE_DICT.format(path=path)) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(_NOT_A_STATE_DICT.format(path=path))
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:
        raise ModelError(
            f"{path} does not fit {architecture}: missing {missing[:5]}, unexpected {extra[:5]}; "
            "check models.large"
        )
    for name, ref in reference.items():
        if state[name].shape != ref.shape:
            raise ModelError(
                f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, {architecture} needs "
                f"{tuple(ref.shape)} (a different class count or input size?)"
            )
    return {name: state[name].to(ref.dtype) for name, ref in reference.items()}


def evaluate_state(architecture: str, spec: InputSpec, state: StateDict, data: ImageSplit) -> dict[str, float]:
    """Test accuracy and loss of `state` on `data` (on the data's device)."""
    return evaluate(instantiate(architecture, spec, state, data.images.device), data)
