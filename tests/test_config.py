"""Config loading: defaults, TOML files, overrides, and a clear error for every kind of bad input."""

from pathlib import Path

import pytest
import tomli_w
from helpers import DIGITS

from koala.config import (
    ExperimentConfig,
    config_from_toml,
    config_to_dict,
    config_to_toml,
    load_config,
)
from koala.errors import ConfigError
from koala.run.launch import run_local

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_defaults_are_valid() -> None:
    config = load_config()
    assert config.algorithm == "koala"
    assert config.data.num_clients == 20 and config.distill.temperature == 3.0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_run_a_round_as_their_method(path: Path, tmp_path: Path) -> None:
    # each shipped config, on digits with LeNets for speed, runs its method for one round: every
    # lever it sets is accepted by a real run, and the run is the method and mode it says it is
    config = load_config(path)
    # a config of device classes plans its models from the budgets (tests/test_devices.py): here each
    # class gets the one candidate, a LeNet
    planned = bool(config.devices)
    small = "['lenet','mobilenetv3-small']" if config.models.heterogeneous and not planned else "['lenet']"
    capability = ["models.capability=['lenet']"] if config.models.capability else []
    labelled = ["data.proxy-labelled=100"] if config.data.proxy_labelled else []
    overrides = [*DIGITS, "data.num-clients=4", "data.proxy-fraction=0.2", "data.proxy-size=0", "data.client-size=0",
                 "data.validation-size=0", "models.large='lenet'", f"models.small={small}", *capability, "rounds=1",
                 "large-init.pretrain.epochs=1", "device='cpu'", *labelled]
    result = run_local(load_config(path, overrides), tmp_path / "run", echo=lambda _: None)
    summary = result.summary
    assert summary["algorithm"] == config.algorithm and summary["rounds"] == 1
    expected_mode = ("heterogeneous" if config.models.heterogeneous and not planned and config.algorithm != "fedavg-large"
                     else "homogeneous")
    assert summary["mode"] == expected_mode
    line = result.metrics[1]
    distils = config.algorithm in ("koala", "feddf")
    assert ("reverse-loss" in line) == distils
    assert any(k.startswith("forward-loss:") for k in line) == (config.algorithm == "koala")
    assert (line["clients"] == 0) == (config.algorithm == "centralised")
    assert [plan["class"] for plan in summary.get("devices", [])] == [d.name for d in config.devices]


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"quickstart.toml", "koala-homogeneous.toml", "koala-heterogeneous.toml", "paper-literal.toml",
            "fedavg-large.toml", "fedavg-small.toml", "feddf.toml", "centralised.toml"} <= names


def test_the_paper_literal_preset_pins_the_round_as_described() -> None:
    config = load_config(Path(__file__).parent.parent / "configs" / "paper-literal.toml")
    distill = config.distill
    assert config.algorithm == "koala" and distill.teacher == "averaged" and distill.reverse_ce_weight == 0
    assert distill.forward_warmup_rounds == 0 and distill.forward_mix == 1 and distill.forward.epochs == 1
    assert distill.reverse.epochs == 1 and not distill.keep_optimizer_state and distill.reverse_kd_scaling == "none"


def test_kebab_case_file_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('rounds = 3\n[data]\nnum-clients = 5\nproxy-fraction = 0.2\n[distill.reverse]\nepochs = 2\n')
    config = load_config(path)
    assert (config.rounds, config.data.num_clients, config.distill.reverse.epochs) == (3, 5, 2)
    again = tmp_path / "again.toml"
    again.write_text(tomli_w.dumps(config_to_dict(config)))
    assert load_config(again) == config


def test_overrides_parse_toml_values() -> None:
    config = load_config(None, ["data.alpha=0.3", "models.small=['lenet', 'shufflenetv2']", "name=abc"])
    assert config.data.alpha == 0.3
    assert config.models.small == ["lenet", "shufflenetv2"] and config.models.heterogeneous
    assert config.name == "abc"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.alpah=1"], "data.alpah: unknown key. Did you mean 'alpha'?"),
        (["clientt.lr=1"], "clientt: unknown key. Did you mean 'client'?"),
        (["rounds='ten'"], "rounds: Input should be a valid integer"),
        (["client.lr='fast'"], "client.lr: Input should be a valid number"),
        (["data.alpha=0"], "data.alpha: Input should be greater than 0"),
        (["data.alpha=-1.5"], "data.alpha: Input should be greater than 0"),
        (["client.participation=0"], "client.participation: Input should be greater than 0"),
        (["client.participation=1.5"], "client.participation: Input should be less than or equal to 1"),
        (["data.proxy-fraction=1.0"], "data.proxy-fraction: Input should be less than 1"),
        (["algorithm='fedprox'"], "algorithm: Input should be 'koala', 'fedavg-large', 'fedavg-small', 'feddf' or 'centralised'"),
        (["data.dataset='mnist'"], "data.dataset: Input should be"),
        (["models.small=['lenet','shufflenetv2']", "models.small-shares=[0.5,0.4]"], "must be positive and sum to 1"),
        (["models.small=['lenet','shufflenetv2']", "models.small-shares=[1.0]"], "give one share per small architecture"),
        (["models.small=['lenet','lenet']"], "lists an architecture twice"),
        (["data.num-clients=2", "models.assignment=['lenet']"], "give one architecture per client"),
        (["models.assignment=['vgg11','lenet']", "data.num-clients=2"], "not in models.small"),
        (["large-init.kind='file'"], "needs large-init.path"),
        (["large-init.kind='pretrain'"], "needs a labelled server set"),
        (["rounds"], "expected key=value"),
        (["rounds=0"], "rounds: Input should be greater than or equal to 1"),
        (["data.num-clients=10", "client.participation=0.2", "client.min-replies=3"],
         "client.min-replies = 3 but a round samples only 2 client(s)"),
        (["flower.round-timeout=0"], "flower.round-timeout: Input should be greater than 0"),
        (["distill.batch-size=64"], "distill.batch-size: unknown key"),
        (["client.batch-size=1"], "client.batch-size: Input should be greater than or equal to 2"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value)


def test_config_travels_as_toml_text() -> None:
    config = load_config(None, ["data.num-clients=7", "models.small=['lenet', 'shufflenetv2']", "flower.node-timeout=5"])
    assert config_from_toml(config_to_toml(config), "sent") == config
    with pytest.raises(ConfigError, match="the server's message is not valid TOML"):
        config_from_toml("rounds = = 2", "the server's message")
    with pytest.raises(ConfigError, match="invalid configuration in the server's message"):
        config_from_toml("rounds = 0", "the server's message")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(broken)


def test_config_is_frozen() -> None:
    config = ExperimentConfig()
    with pytest.raises(Exception):
        config.rounds = 5  # type: ignore[misc]


@pytest.mark.parametrize("preset, small", [
    ("cifar10-homogeneous", "['mobilenetv2']"), ("cifar10-homogeneous", "['shufflenetv2']"),
    ("cifar10-homogeneous", "['mobilenetv3-small']"), ("cifar10-heterogeneous", None),
])
def test_the_papers_cifar10_presets_run_a_tiny_round(preset: str, small: str | None, tmp_path: Path) -> None:
    from helpers import CONFIGS, write_cifar10

    data = write_cifar10(tmp_path / "cifar10", per_batch=24, test=20)
    overrides = [f"data.dir='{data}'", "device='cpu'", "rounds=1", "threads=1", "data.num-clients=3",
                 "data.proxy-fraction=0.2", "data.proxy-labelled=8", "data.min-client-size=5", "data.partition='iid'",
                 "large-init.pretrain.epochs=1", "client.batch-size=8", "distill.reverse.batch-size=8",
                 "distill.forward.batch-size=8", "large-init.pretrain.batch-size=8"]
    if small:
        overrides.append(f"models.small={small}")
    config = load_config(CONFIGS / f"{preset}.toml", overrides)
    result = run_local(config, tmp_path / "run", echo=lambda _: None)
    summary = result.summary
    assert summary["large"] == "vgg19" and summary["dataset"] == "cifar10" and summary["split"]["test"] == 20
    expected = {"mobilenetv2": 1, "shufflenetv2": 1, "mobilenetv3-small": 1} if small is None else {small[2:-2]: 3}
    assert summary["small"] == expected and summary["mode"] == ("heterogeneous" if small is None else "homogeneous")
    assert result.metrics[1]["accepted"] == 3 and "reverse-loss" in result.metrics[1]
    assert {f"{role}:{arch}" for arch in expected for role in ("small", "averaged")} | {"large"} == set(result.metrics[1]["eval"])
