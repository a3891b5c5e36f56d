"""Per-architecture FedAvg against hand computations, and update validation."""

import pytest
import torch

from koala.aggregate import aggregate_by_architecture, fedavg, validate_update
from koala.errors import UpdateRejected
from koala.state import ClientUpdate

REFERENCE = {"w": torch.zeros(2, 2), "bn.num_batches_tracked": torch.tensor(0)}


def _update(cid: int, arch: str, value: float, n: int, batches: int = 10) -> ClientUpdate:
    return ClientUpdate(cid, arch, {"w": torch.full((2, 2), value), "bn.num_batches_tracked": torch.tensor(batches)}, n)


def test_fedavg_weighted_by_sample_count() -> None:
    avg = fedavg([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}], [1, 3])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))  # (1·1 + 3·3)/4, (2·1 + 6·3)/4


def test_fedavg_keeps_dtypes_and_rounds_integer_buffers() -> None:
    avg = fedavg([_update(0, "a", 1.0, 1, batches=10).state, _update(1, "a", 2.0, 2, batches=13).state], [1, 2])
    assert avg["bn.num_batches_tracked"].dtype == torch.int64
    assert avg["bn.num_batches_tracked"].item() == 12  # (10 + 26) / 3
    assert avg["w"].dtype == torch.float32


def test_aggregate_groups_by_architecture() -> None:
    updates = [_update(0, "lenet", 1.0, 100), _update(1, "shufflenetv2", 5.0, 10), _update(2, "lenet", 4.0, 200)]
    groups = aggregate_by_architecture(updates)
    assert sorted(groups) == ["lenet", "shufflenetv2"]
    assert torch.allclose(groups["lenet"].state["w"], torch.full((2, 2), 3.0))  # (100·1 + 200·4)/300
    assert (groups["lenet"].num_examples, groups["lenet"].num_clients) == (300, 2)
    assert torch.allclose(groups["shufflenetv2"].state["w"], torch.full((2, 2), 5.0))


def test_valid_update_passes() -> None:
    validate_update(_update(0, "lenet", 1.0, 5), "lenet", REFERENCE)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (_update(0, "vgg11", 1.0, 5), "sent architecture 'vgg11' but was assigned 'lenet'"),
        (_update(0, "lenet", float("nan"), 5), "holds NaN or Inf"),
        (_update(0, "lenet", float("inf"), 5), "holds NaN or Inf"),
        (_update(0, "lenet", 1.0, 0), "expected a positive integer"),
        (ClientUpdate(0, "lenet", {"w": torch.zeros(3, 2), "bn.num_batches_tracked": torch.tensor(0)}, 5), "is (3, 2)"),
        (ClientUpdate(0, "lenet", {"w": torch.zeros(2, 2, dtype=torch.float64), "bn.num_batches_tracked": torch.tensor(0)}, 5), "torch.float64"),
        (ClientUpdate(0, "lenet", {"w": torch.zeros(2, 2)}, 5), "missing ['bn.num_batches_tracked']"),
        (ClientUpdate(0, "lenet", {**REFERENCE, "extra": torch.zeros(1)}, 5), "unexpected ['extra']"),
    ],
)
def test_invalid_updates_are_rejected_with_reason(update: ClientUpdate, message: str) -> None:
    with pytest.raises(UpdateRejected) as info:
        validate_update(update, "lenet", REFERENCE)
    assert message in str(info.value)
