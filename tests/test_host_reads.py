"""The GPU path reads no value back to the host inside a training step.

On a GPU every read of a tensor's value on the host (`.item()`, `float(t)`, `if t:`, boolean
masks, `nonzero`) waits for the device to finish its queue. The loops may read once per call or
per epoch (the reported loss, early stopping), never per step. This is checked here on the CPU by
counting the operators that such reads dispatch to during a whole run, once with twice as many
steps as the other: the count must not change. (`.tolist()` and `.cpu()` of a CPU tensor
dispatch nothing, so those two are not seen on this machine.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from koala.config import load_config
from koala.engine.local import run_local

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.toml"
aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class HostReads(TorchDispatchMode):
    """Counts the operators that read a tensor's value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or (func is aten.index.Tensor and any(
                index is not None and index.dtype == torch.bool for index in args[1])):
            self.count += 1
        return func(*args, **kwargs)


# Every lever that adds work inside a step: two architectures (one with BatchNorm), the ensemble
# teacher with a fusion rule, CE on labelled proxy images, momentum kept, augmentation, cosine rates,
# forward mixing and early stopping.
EVERY_LEVER = [
    "data.dataset='digits'", "data.train-limit=800", "data.test-limit=200", "data.min-client-size=20",
    "data.num-clients=4", "data.proxy-fraction=0.3", "data.proxy-labelled=100", "models.large='lenet'",
    "models.small=['lenet','shufflenetv2-0.5']", "client.epochs=2", "rounds=2", "large-init.kind='pretrain'", "large-init.pretrain.epochs=1",
    "distill.teacher='ensemble'", "distill.fusion='confidence'", "distill.reverse-ce-weight=1.0",
    "distill.keep-optimizer-state=true", "distill.forward-mix=0.5", "distill.reverse.flip=true",
    "distill.reverse.max-shift=1", "distill.forward.lr-schedule='cosine'", "client.lr-schedule='cosine'",
    "distill.reverse.epochs=2", "distill.reverse.holdout-fraction=0.2",
]


def _host_reads(tmp_path: Path, batch_size: int, *overrides: str) -> int:
    sizes = [f"{section}.batch-size={batch_size}" for section in ("client", "distill.reverse", "distill.forward",
                                                                   "large-init.pretrain")]
    config = load_config(QUICKSTART, [*EVERY_LEVER, *sizes, *overrides])
    with HostReads() as reads:
        run_local(config, tmp_path / f"batch-{batch_size}", echo=lambda _: None)
    return reads.count


@pytest.mark.parametrize("vectorised", ["false", "true"])
def test_doubling_the_steps_adds_no_host_read(tmp_path: Path, vectorised: str) -> None:
    many_steps = _host_reads(tmp_path, 8, f"client.vectorised={vectorised}")
    few_steps = _host_reads(tmp_path, 16, f"client.vectorised={vectorised}")
    assert few_steps > 0  # the counter sees the per-epoch and per-call reads
    assert many_steps == few_steps
