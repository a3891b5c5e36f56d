"""The GPU path reads no value back to the host inside a training step.

On a GPU every read of a tensor's value on the host (`.item()`, `float(t)`, `if t:`, boolean
masks, `nonzero`) waits for the device to finish its queue, and so does a tensor made from host
data (`torch.tensor([...], device="cuda")`). The loops may do either once per call or per epoch
(the reported loss, early stopping), never per step. This is checked here on the CPU by counting
the operators those dispatch to during a whole run, once with twice as many steps as the other:
the count must not change. (`.tolist()` and `.cpu()` of a CPU tensor dispatch nothing, so those
two are not seen on this machine.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import BASE
from torch.utils._python_dispatch import TorchDispatchMode

from koala.config import load_config
from koala.run.launch import run_local

aten = torch.ops.aten


def _reads_the_host(func: torch._ops.OpOverload, args: tuple[Any, ...]) -> bool:
    """Whether `func` waits on a GPU: it reads a value (`.item()`), its output's shape depends on
    the values (`nonzero`, `unique`, boolean masks), or it makes a tensor from host data
    (`torch.tensor(...)`, copied to a GPU synchronously)."""
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return any(index is not None and index.dtype == torch.bool for index in args[1])
    return (torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags
            or func is aten.lift_fresh.default)


class HostReads(TorchDispatchMode):
    """Counts the operators that read tensor values back to the host, and the backward passes of
    convolutions (to show that the training steps were seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.convolution_backwards = 0

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        self.reads += _reads_the_host(func, args)
        self.convolution_backwards += func is aten.convolution_backward.default
        return func(*args, **(kwargs or {}))


# Every lever that adds work inside a step: two architectures (one with BatchNorm), the ensemble
# teacher with a fusion rule (run on every augmented batch), CE on labelled proxy images, momentum
# kept, weight decay, augmentation in both directions, cosine rates, forward mixing and early
# stopping's held-out loss, read once an epoch (2 epochs at patience 2: neither run stops early, since
# a run stopped an epoch earlier would read one value less).
EVERY_LEVER = [
    "data.dataset='digits'", "data.train-limit=800", "data.test-limit=200", "data.min-client-size=20",
    "data.num-clients=4", "data.proxy-fraction=0.3", "data.proxy-labelled=100", "models.large='lenet'",
    "models.small=['lenet','shufflenetv2-0.5']", "client.epochs=2", "client.weight-decay=0.0001", "rounds=2",
    "large-init.kind='pretrain'", "large-init.pretrain.epochs=1", "distill.teacher='ensemble'",
    "distill.fusion='confidence'", "distill.reverse-ce-weight=1.0", "distill.keep-optimizer-state=true",
    "distill.forward-mix=0.5", "distill.reverse.flip=true", "distill.reverse.max-shift=1",
    "distill.forward.flip=true", "distill.forward.lr-schedule='cosine'", "client.lr-schedule='cosine'",
    "distill.reverse.epochs=2", "distill.reverse.holdout-fraction=0.2", "distill.reverse.patience=2",
]


def _run(tmp_path: Path, batch_size: int, vectorised: bool) -> HostReads:
    sizes = [f"{section}.batch-size={batch_size}" for section in ("client", "distill.reverse", "distill.forward",
                                                                   "large-init.pretrain")]
    config = load_config(BASE, [*EVERY_LEVER, *sizes, f"client.vectorised={str(vectorised).lower()}"])
    with HostReads() as counter:
        run = run_local(config, tmp_path / f"batch-{batch_size}", echo=lambda _: None)
    rounds = [line for line in run.metrics if "accepted" in line]
    assert [(line["accepted"], line.get("failed")) for line in rounds] == [(4, None)] * 2  # every client trained
    return counter


@pytest.mark.parametrize("vectorised", [False, True])
def test_doubling_the_steps_adds_no_host_read(tmp_path: Path, vectorised: bool) -> None:
    many_steps = _run(tmp_path, 8, vectorised)
    few_steps = _run(tmp_path, 16, vectorised)
    assert many_steps.convolution_backwards > 1.5 * few_steps.convolution_backwards  # the steps were seen
    assert few_steps.reads > 0  # the per-epoch and per-call reads are seen too
    assert many_steps.reads == few_steps.reads
