"""Resource accounting: FLOPs against hand formulas, bytes against real payloads, reductions, and the
figures a real run writes (checked against a real FedAvg-large run on the same clients)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from koala.accounting.ledger import reduction, reductions_against_fedavg_large
from koala.accounting.measure import (
    CostTable,
    inference_flops,
    measure_model,
    payload_bytes,
    saved_activation_bytes,
    train_step_flops,
)
from koala.config import load_config
from koala.models import InputSpec, build_model, count_parameters
from koala.run.launch import run_local
from koala.run.run_dir import read_metrics
from koala.training import samples_per_epoch

MNIST = InputSpec(1, 28, 10)
BATCH, SIZE = 4, 10


def _images(channels: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(BATCH, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).requires_grad_(requires_grad)


@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
def test_conv_flops_equal_the_hand_formula(groups: int) -> None:
    channels, kernel = 8, 3
    model = nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=1, groups=groups, bias=False), nn.Flatten())
    labels = torch.tensor([0, 1, 2, 3])
    forward = 2 * BATCH * channels * (channels // groups) * kernel**2 * SIZE * SIZE
    assert inference_flops(model, _images(channels)) == forward
    # Backward: the weight gradient costs one forward; the input gradient another, when it is needed.
    assert train_step_flops(model, _images(channels), labels) == 2 * forward
    assert train_step_flops(model, _images(channels, requires_grad=True), labels) == 3 * forward


def test_linear_flops_equal_the_hand_formula() -> None:
    features, classes = 3 * SIZE * SIZE, 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    labels = torch.tensor([0, 1, 2, 3])
    forward = 2 * BATCH * features * classes
    assert inference_flops(model, _images(3)) == forward
    assert train_step_flops(model, _images(3), labels) == 2 * forward
    assert train_step_flops(model, _images(3, requires_grad=True), labels) == 3 * forward


@pytest.mark.parametrize("name", ["lenet", "resnet18-ds", "mobilenetv2", "shufflenetv2-0.5", "mobilenetv3-small"])
def test_training_costs_about_three_forward_passes(name: str) -> None:
    cost = measure_model(name, MNIST, batch_size=8)
    assert 2.5 < cost.train_flops_per_sample / cost.inference_flops_per_sample < 3.2


def test_flops_per_sample_do_not_depend_on_the_batch() -> None:
    assert measure_model("lenet", MNIST, batch_size=2).train_flops_per_sample == measure_model("lenet", MNIST, batch_size=50).train_flops_per_sample


def test_model_cost_matches_the_real_model() -> None:
    torch.manual_seed(0)
    model = build_model("shufflenetv2-0.5", MNIST)
    cost = measure_model("shufflenetv2-0.5", MNIST, batch_size=16)
    assert cost.parameters == count_parameters(model) == 351_610
    assert cost.state_bytes == len(safetensors_bytes(model.state_dict()))


def test_payload_bytes_is_the_serialized_length_for_any_values() -> None:
    model = build_model("lenet", MNIST)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert payload_bytes(state) == len(safetensors_bytes(state))
    state = {k: v * 3 + 1 for k, v in state.items()}  # same signature, new values: the remembered length still holds
    assert payload_bytes(state) == len(safetensors_bytes(state))
    half = {k: v.half() for k, v in state.items()}
    assert payload_bytes(half) == len(safetensors_bytes(half)) < payload_bytes(state)


def test_training_memory_counts_weights_gradients_momentum_and_activations() -> None:
    model = build_model("lenet", MNIST)
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    with_momentum = measure_model("lenet", MNIST, batch_size=32, momentum=True).train_memory_bytes
    without = measure_model("lenet", MNIST, batch_size=32, momentum=False).train_memory_bytes
    assert with_momentum - without == parameter_bytes
    activations = {
        batch: saved_activation_bytes(model, torch.randn(batch, 1, 28, 28), torch.zeros(batch, dtype=torch.long))
        for batch in (16, 32, 64)
    }
    assert activations[32] > 32 * 28 * 28 * 4  # at least the input batch itself
    # Activations grow linearly with the batch (the weights are not among them).
    assert activations[64] - activations[32] == 2 * (activations[32] - activations[16]) > 0
    assert without == sum(t.numel() * t.element_size() for t in model.state_dict().values()) + parameter_bytes + activations[32]


def test_reductions_on_a_constructed_example() -> None:
    assert reduction(25, 100) == 0.75 and reduction(1, 0) is None
    costs = CostTable(MNIST, batch_size=8, momentum=True)
    small, other, large = costs["lenet"], costs["shufflenetv2-0.5"], costs["resnet18-ds"]
    clients = {0: "lenet", 1: "lenet", 2: "shufflenetv2-0.5"}
    totals = {
        "client-flops": 100 * small.train_flops_per_sample * 2 + 50 * other.train_flops_per_sample,
        "trained-samples": 250,
        "bytes-down": 2 * small.state_bytes + other.state_bytes,
        "clients-sent": 3,
        "bytes-up": 2 * small.state_bytes,  # client 2 never replied
        "replies": 2,
    }
    result = reductions_against_fedavg_large(costs, "resnet18-ds", clients, totals)
    mean_storage = (2 * small.state_bytes + other.state_bytes) / 3
    assert result["storage"] == pytest.approx(1 - mean_storage / large.state_bytes)
    assert result["client-flops"] == pytest.approx(1 - totals["client-flops"] / (250 * large.train_flops_per_sample))
    assert result["bytes-down"] == pytest.approx(1 - totals["bytes-down"] / (3 * large.state_bytes))
    assert result["bytes-up"] == pytest.approx(1 - small.state_bytes / large.state_bytes)
    assert result["per-architecture"]["lenet"]["storage"] == pytest.approx(1 - small.state_bytes / large.state_bytes)
    assert 0.9 < result["storage"] < 1


from helpers import DIGITS as DIGITS_DATA  # noqa: E402

DIGITS = [*DIGITS_DATA, "data.num-clients=4", "models.large='mobilenetv3-small'", "models.small=['lenet']",
          "rounds=2", "client.participation=0.75"]


@pytest.mark.integration
def test_a_run_records_real_bytes_and_flops_that_a_fedavg_large_run_confirms(tmp_path: Path) -> None:
    koala = run_local(load_config(None, DIGITS), tmp_path / "koala", echo=lambda _: None)
    fedavg = run_local(load_config(None, [*DIGITS, "algorithm='fedavg-large'"]), tmp_path / "fedavg", echo=lambda _: None)
    resources = json.loads((tmp_path / "koala" / "resources.json").read_text())
    lenet, large = resources["architectures"]["lenet"], resources["architectures"]["mobilenetv3-small"]
    metrics = read_metrics(tmp_path / "koala")

    for line in metrics[1:]:
        round_ = line["resources"]
        assert len(round_["per-client"]) == 3  # 0.75 of 4 clients
        for client in round_["per-client"]:
            assert client["bytes-down"] == client["bytes-up"] == lenet["state-bytes"]
            assert client["flops"] == client["trained-samples"] * lenet["train-flops-per-sample"]
        assert round_["bytes-down"] == 3 * lenet["state-bytes"]
        # the averaged LeNet's inference on the proxy set, one reverse epoch of the large model, its
        # inference for forward distillation and one forward epoch of the LeNet (trailing single
        # examples dropped from the epochs, as BatchNorm needs two)
        proxy = koala.summary["split"]["proxy"]
        trained = samples_per_epoch(proxy, 64)
        assert round_["server-flops"] == (proxy * lenet["inference-flops-per-sample"] + trained * large["train-flops-per-sample"]
                                          + proxy * large["inference-flops-per-sample"] + trained * lenet["train-flops-per-sample"])
    assert metrics[0]["resources"]["server-flops"] == 0  # random large start: no pretraining

    # The counterfactual the reductions use is what FedAvg-large really spends on the same clients.
    fedavg_totals = fedavg.summary["resources"]
    koala_totals = koala.summary["resources"]
    assert fedavg_totals["trained-samples"] == koala_totals["trained-samples"]
    assert fedavg_totals["client-flops"] == koala_totals["trained-samples"] * large["train-flops-per-sample"]
    assert fedavg_totals["bytes-up"] == koala_totals["replies"] * large["state-bytes"]
    saved = koala.summary["reductions-vs-fedavg-large"]
    assert saved["client-flops"] == pytest.approx(1 - koala_totals["client-flops"] / fedavg_totals["client-flops"])
    assert saved["bytes-up"] == pytest.approx(1 - koala_totals["bytes-up"] / fedavg_totals["bytes-up"])
    assert saved["bytes-down"] == pytest.approx(1 - koala_totals["bytes-down"] / fedavg_totals["bytes-down"])
    assert saved["storage"] == pytest.approx(1 - lenet["state-bytes"] / large["state-bytes"])
    assert fedavg.summary["reductions-vs-fedavg-large"]["client-flops"] == 0
    assert resources["client-architectures"] == {"lenet": 4}


@pytest.mark.integration
def test_pretraining_is_counted_as_server_work(tmp_path: Path) -> None:
    overrides = [*DIGITS, "data.proxy-labelled=100", "large-init.kind='pretrain'", "large-init.pretrain.epochs=2",
                 "large-init.pretrain.batch-size=32", "rounds=1"]
    result = run_local(load_config(None, overrides), tmp_path / "run", echo=lambda _: None)
    large = json.loads((tmp_path / "run" / "resources.json").read_text())["architectures"]["mobilenetv3-small"]
    assert result.metrics[0]["resources"]["server-flops"] == 2 * 100 * large["train-flops-per-sample"]


def test_where_the_high_water_mark_cannot_be_reset_a_sampler_sees_what_a_block_allocates() -> None:
    from koala.accounting.footprint import ResidentSampler, current_resident_mb

    idle = current_resident_mb()
    with ResidentSampler() as sampler:
        block = bytearray(200_000_000)
        block[::4096] = b"\x01" * len(block[::4096])  # touch every page, so that it is resident
        time.sleep(0.05)
        del block
    assert sampler.peak_mb - idle > 150


def test_the_measured_footprint_grows_with_the_batch_and_bounds_the_estimate_from_above(capsys) -> None:
    # a fresh process per measurement; training adds the framework's fixed cost (kernels, thread
    # pools, allocator arenas: about 100 MB here) plus what the batch needs, of which the accounting's
    # estimate is a lower bound
    from koala.accounting.footprint import measure_footprint

    small, large = (measure_footprint("lenet", MNIST, batch, threads=1, samples=1024) for batch in (16, 512))
    assert large.training_peak_mb > small.training_peak_mb + 0.5 * (large.estimate_mb - small.estimate_mb)
    for footprint in (small, large):
        assert footprint.idle_peak_mb > 50 and footprint.seconds_per_sample > 0
        assert footprint.estimate_mb <= footprint.increase_mb <= 200 + 2 * footprint.estimate_mb
    from koala.cli import main

    assert main(["footprint", "--model", "lenet", "--batch-size", "8", "--samples", "64"]) == 0
    table = capsys.readouterr().out
    assert "| lenet | 8 | channels_last |" in table and "lower bound" in table and "each model's own layout" in table
    assert main(["footprint", "--model", "lenet", "--batch-size", "8", "--samples", "64", "--contiguous"]) == 0
    assert "| lenet | 8 | contiguous |" in capsys.readouterr().out  # read from the trained weights
    assert main(["footprint", "--model", "lenet", "--batch-size", "128", "--samples", "64"]) == 2
