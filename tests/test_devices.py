"""Device profiles: each device class gets the most capable small model within its budgets."""

import re
from pathlib import Path

import pytest
from helpers import BASE, DIGITS

from koala.accounting.measure import ModelCost
from koala.algorithms.devices import device_classes_of_clients, plan_devices
from koala.config import load_config
from koala.errors import ConfigError
from koala.run.launch import run_local

# three candidates with round numbers: (parameters, state MB, training MFLOPs a sample, training memory MB)
COSTS = {
    "tiny": ModelCost("tiny", 1_000, 1_000_000, 1_000_000, 0, 10_000_000, 64),
    "mid": ModelCost("mid", 10_000, 4_000_000, 5_000_000, 0, 40_000_000, 64),
    "big": ModelCost("big", 100_000, 20_000_000, 30_000_000, 0, 200_000_000, 64),
}
SIZES = {0: 100, 1: 200, 2: 640, 3: 64}


def _config(*devices: str, capability: str = "") -> object:
    overrides = ["models.small=['tiny','mid','big']", "data.num-clients=4", f"devices=[{', '.join(devices)}]"]
    if capability:
        overrides.append(f"models.capability={capability}")
    return load_config(None, overrides)


def _plan(config, classes):
    return {p.device_class: p for p in plan_devices(config, classes, COSTS.__getitem__, SIZES)}


def _device(name: str, count: int, memory: float, flops: float = 0, upload: float = 0) -> str:
    return f'{{name="{name}", count={count}, memory-mb={memory}, flops-per-round={flops}, upload-mb={upload}}}'


def test_each_class_gets_the_most_capable_model_within_its_budgets() -> None:
    config = _config(_device("watch", 1, 15), _device("phone", 2, 100), _device("hub", 1, 1000))
    plan = _plan(config, ["phone", "watch", "hub", "phone"])
    assert {name: p.architecture for name, p in plan.items()} == {"watch": "tiny", "phone": "mid", "hub": "big"}
    assert plan["phone"].clients == (0, 3) and plan["phone"].memory_mb == 40 and plan["phone"].memory_budget_mb == 100


def test_a_budget_exactly_at_the_need_fits() -> None:
    config = _config(_device("a", 2, 40), _device("b", 2, 39.999))
    plan = _plan(config, ["a", "a", "b", "b"])
    assert plan["a"].architecture == "mid" and plan["b"].architecture == "tiny"


def test_the_flops_budget_holds_for_the_classs_largest_client_and_the_upload_budget_for_the_state() -> None:
    # class a holds clients 2 (640 examples) and 3 (64): one epoch of mid for client 2 is 640 x 5 MFLOPs =
    # 3.2 GFLOPs, exactly a's budget; big's 19.2 GFLOPs are over it
    classes = ["b", "b", "a", "a"]
    plan = _plan(_config(_device("a", 2, 1000, flops=3.2e9), _device("b", 2, 1000, flops=7e9, upload=25)), classes)
    assert plan["a"].architecture == "mid" and plan["a"].flops_per_round == 3.2e9
    assert plan["b"].architecture == "big" and plan["b"].flops_per_round == 6e9  # its largest client holds 200
    tighter = _plan(_config(_device("a", 2, 1000), _device("b", 2, 1000, flops=5.9e9)), classes)
    assert tighter["b"].architecture == "mid"  # big's 6 GFLOPs for 200 examples are over 5.9
    upload = _plan(_config(_device("a", 2, 1000), _device("b", 2, 1000, upload=19.9)), classes)
    assert upload["b"].architecture == "mid" and upload["a"].architecture == "big"  # big's state is 20 MB


def test_no_model_fits_is_an_error_naming_the_class_its_budget_and_the_smallest_need() -> None:
    config = _config(_device("sensor", 2, 5), _device("phone", 2, 100))
    with pytest.raises(ConfigError, match=r"device class 'sensor' fits no model of models.small: its training-memory "
                                          r"budget is 5 MB, and the smallest need is 10 MB \(tiny at client.batch-size 64\)"):
        _plan(config, ["sensor", "sensor", "phone", "phone"])


def test_a_capability_order_given_by_the_config_is_respected() -> None:
    # by parameters, big is the most capable; an order that puts mid last makes every class take mid when it fits
    config = _config(_device("a", 4, 1000), capability="['tiny','big','mid']")
    assert _plan(config, ["a"] * 4)["a"].architecture == "mid"


def test_clients_are_dealt_to_classes_by_count_or_share_with_the_seed() -> None:
    by_count = _config(_device("a", 1, 10), _device("b", 3, 10))
    classes = device_classes_of_clients(by_count.devices, 4, seed=0)
    assert sorted(classes) == ["a", "b", "b", "b"] and classes == device_classes_of_clients(by_count.devices, 4, seed=0)
    by_share = load_config(None, ["data.num-clients=10", 'devices=[{name="a", share=0.25, memory-mb=10}, '
                                  '{name="b", share=0.75, memory-mb=10}]'])
    assert sorted(device_classes_of_clients(by_share.devices, 10, seed=3)).count("a") == 3  # 2.5 rounds up by remainder


@pytest.mark.parametrize("devices, message", [
    ('[{name="a", share=0.5, memory-mb=10}, {name="b", count=2, memory-mb=10}]', "every class a share, or every class a count"),
    ('[{name="a", share=0.5, memory-mb=10}, {name="b", share=0.4, memory-mb=10}]', "the shares must sum to 1"),
    ('[{name="a", count=1, memory-mb=10}, {name="b", count=2, memory-mb=10}]', "the counts sum to 3 but data.num-clients is 4"),
    ('[{name="a", count=2, memory-mb=10}, {name="a", count=2, memory-mb=10}]', "a class name is given twice"),
    ('[{name="a", count=4}]', "devices[0].memory-mb: Field required"),
])
def test_device_classes_that_cannot_cover_the_clients_are_refused(devices: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.num-clients=4", f"devices={devices}"])
    with pytest.raises(ConfigError, match="devices choose each client's small model: drop models.small-shares"):
        load_config(None, ["data.num-clients=4", "models.small=['lenet','lenet-wide']", "models.small-shares=[0.5,0.5]",
                           'devices=[{name="a", count=4, memory-mb=10}]'])


def test_a_run_plans_its_clients_models_from_device_classes_and_records_the_plan(tmp_path: Path) -> None:
    # on digits (8x8) at batch 32: lenet-narrow needs 0.2 MB, lenet 0.5 MB, lenet-wide 1.4 MB of training memory
    devices = ('devices=[{name="sensor", count=2, memory-mb=0.3}, {name="phone", count=2, memory-mb=1.0}, '
               '{name="hub", count=2, memory-mb=64}]')
    overrides = [*DIGITS, "data.num-clients=6", "models.large='lenet'", "rounds=1", "client.batch-size=32",
                 "models.small=['lenet-narrow','lenet','lenet-wide']", devices]
    printed: list[str] = []
    result = run_local(load_config(BASE, overrides), tmp_path / "run", echo=printed.append)
    plan = {entry["class"]: entry for entry in result.summary["devices"]}
    assert {name: entry["architecture"] for name, entry in plan.items()} == \
        {"sensor": "lenet-narrow", "phone": "lenet", "hub": "lenet-wide"}
    assert all(entry["memory-mb"] <= entry["memory-budget-mb"] and entry["clients"] == 2 for entry in plan.values())
    assert result.summary["small"] == {"lenet": 2, "lenet-narrow": 2, "lenet-wide": 2}
    assert result.summary["mode"] == "heterogeneous"
    assert any(line.startswith("  device class sensor (2 clients) -> lenet-narrow: training memory") for line in printed)
    per_client = {c["client"]: c["architecture"] for c in result.metrics[1]["resources"]["per-client"]}
    assert sorted(per_client.values()) == ["lenet", "lenet", "lenet-narrow", "lenet-narrow", "lenet-wide", "lenet-wide"]
