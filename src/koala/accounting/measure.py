"""What a model costs: parameters, serialized bytes, training and inference FLOPs per sample and the
memory of one training step, measured once per architecture (`CostTable`).

Costs per sample are measured once per architecture on the meta device (shapes only: nothing is
allocated, no random stream is touched), so even ImageNet-sized VGG-19 is measured in a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cache
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch.utils.flop_counter import FlopCounterMode

from koala.errors import ConfigError
from koala.models import InputSpec, build_model, count_parameters

TRAIN_MEMORY_METHOD = (
    "one SGD step at the client batch size: weights and buffers, gradients, the momentum buffer "
    "(when momentum > 0) and the activations autograd saves for the backward pass (measured with "
    "saved-tensor hooks on the meta device, counted once per storage); allocator overhead and "
    "short-lived temporaries are not included"
)


@dataclass(frozen=True)
class ModelCost:
    """The per-architecture figures of resources.json."""

    architecture: str
    parameters: int
    state_bytes: int
    train_flops_per_sample: int
    inference_flops_per_sample: int
    train_memory_bytes: int
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}


def payload_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Length of `state` serialized as safetensors: the bytes a model costs on the wire and on disk.

    The length depends only on tensor names, dtypes and shapes (the safetensors header lists those,
    the body is the raw data), so it is serialized once per signature and remembered.
    """
    signature = tuple((name, str(t.dtype), tuple(t.shape)) for name, t in sorted(state.items()))
    return _serialized_length(signature)


@cache
def _serialized_length(signature: tuple[tuple[str, str, tuple[int, ...]], ...]) -> int:
    tensors = {name: torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch."))) for name, dtype, shape in signature}
    return len(safetensors_bytes(tensors))


def _meta_batch(spec: InputSpec, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch of shapes only (a slice of a larger one would share, and count, its storage)."""
    images = torch.empty(batch_size, spec.channels, spec.image_size, spec.image_size, device="meta")
    return images, torch.zeros(batch_size, dtype=torch.long, device="meta")


def _conv_backward_flops(
    grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], _bias: Any, _stride: Any, _padding: Any,
    _dilation: Any, transposed: bool, _output_padding: Any, _groups: int, output_mask: list[bool], **_: Any,
) -> int:
    """FLOPs of a convolution's backward: the gradient of the input and that of the weight each take
    as many multiply-adds as the forward.

    Written here because torch 2.13's own formula ignores `groups` for the weight gradient and so
    counts a depthwise convolution's backward about `channels` times too high (20x training/forward
    for MobileNetV2 instead of about 3x).
    """
    multiply_adds = prod((x_shape if transposed else grad_out_shape)) * prod(w_shape[1:])
    return 2 * multiply_adds * (int(output_mask[0]) + int(output_mask[1]))


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})


def train_step_flops(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one forward + cross-entropy + backward pass in train mode (2 per multiply-add,
    counted by `torch.utils.flop_counter` for matmul- and conv-type operations)."""
    model.train()
    with _flop_counter() as counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops()


def inference_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one forward pass in eval mode without autograd."""
    model.eval()
    with torch.no_grad(), _flop_counter() as counter:
        model(images)
    return counter.get_total_flops()


def saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training step, each storage
    counted once and the model's own parameters left out."""
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.cross_entropy(model(images), labels)
    return sum(saved.values())


def measure_model(architecture: str, spec: InputSpec, batch_size: int = 64, momentum: bool = True) -> ModelCost:
    """Parameters, serialized bytes, FLOPs per sample and training-step memory of `architecture`.

    FLOPs are measured on a batch of at least 2 (BatchNorm needs 2 in train mode) and divided by it.
    Training memory needs a batch of at least 2 for the same reason.
    """
    if batch_size < 2:
        raise ConfigError(f"batch size {batch_size}: a training step needs at least 2 examples (BatchNorm); use 2 or more")
    with torch.device("meta"):
        model = build_model(architecture, spec)
    images, labels = _meta_batch(spec, batch_size)
    state = model.state_dict()
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    train = train_step_flops(model, images, labels)
    model.zero_grad(set_to_none=True)
    memory = tensor_bytes + parameter_bytes * (2 if momentum else 1)
    memory += saved_activation_bytes(model, *_meta_batch(spec, batch_size))
    return ModelCost(
        architecture=architecture,
        parameters=count_parameters(model),
        state_bytes=payload_bytes(state),
        train_flops_per_sample=train // batch_size,
        inference_flops_per_sample=inference_flops(model, images) // batch_size,
        train_memory_bytes=memory,
        batch_size=batch_size,
    )


class CostTable:
    """Measures each architecture once and turns samples into FLOPs."""

    def __init__(self, spec: InputSpec, batch_size: int, momentum: bool) -> None:
        self.spec, self.batch_size, self.momentum = spec, batch_size, momentum
        self._costs: dict[str, ModelCost] = {}

    def __getitem__(self, architecture: str) -> ModelCost:
        if architecture not in self._costs:
            self._costs[architecture] = measure_model(architecture, self.spec, self.batch_size, self.momentum)
        return self._costs[architecture]

    def flops(self, architecture: str, kind: str, samples: int) -> int:
        """FLOPs of `samples` training ("train") or inference ("inference") passes of `architecture`."""
        cost = self[architecture]
        per_sample = {"train": cost.train_flops_per_sample, "inference": cost.inference_flops_per_sample}[kind]
        return per_sample * samples

    def server_flops(self, work: Mapping[tuple[str, str], int]) -> int:
        """FLOPs of the server's recorded work ((architecture, kind) -> samples)."""
        return sum(self.flops(arch, kind, samples) for (arch, kind), samples in work.items())
