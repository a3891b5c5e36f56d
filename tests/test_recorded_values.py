"""Two rounds of KOALA on digits, pinned to recorded values: a change in the mathematics (a loss, a
fusion weight, a seed stream, an order of summation) fails here even when the run still learns.

Recorded with one torch thread on the development machine (torch 2.13.0 CPU). A deliberate change of
the numbers records them anew, and says why in its commit.
"""

import pytest
from helpers import BASE, DIGITS_KOALA

from koala.config import load_config
from koala.run.launch import run_local

TWO_ROUNDS = [*DIGITS_KOALA, "rounds=2", "threads=1", "client.epochs=3", "distill.temperature=1.0",
              "distill.reverse.epochs=3"]
# three LeNet clients and one MobileNetV3-Small client: the sample-share fusion weighs unequal groups
HETEROGENEOUS = ["models.small=['lenet','mobilenetv3-small']", "models.small-shares=[0.75,0.25]",
                 "distill.fusion='sample-share'"]

RECORDED = {
    "homogeneous": [
        {"large": 0.12222222238779068, "small:lenet": 0.12222222238779068},
        {"reverse-loss": 0.03264099359512329, "forward-loss:lenet": 0.022978097200393677,
         "large": 0.15833333134651184, "small:lenet": 0.4194444417953491},
        {"reverse-loss": 0.11452121287584305, "forward-loss:lenet": 0.0528513565659523,
         "large": 0.49166667461395264, "small:lenet": 0.5277777910232544},
    ],
    "heterogeneous": [
        {"large": 0.12222222238779068, "small:lenet": 0.12222222238779068, "small:mobilenetv3-small": 0.07500000298023224},
        {"reverse-loss": 0.03383529186248779, "forward-loss:lenet": 0.06616578996181488,
         "forward-loss:mobilenetv3-small": 1.3358938694000244,
         "large": 0.1805555522441864, "small:lenet": 0.3722222149372101, "small:mobilenetv3-small": 0.10277777910232544},
        {"reverse-loss": 0.2257702648639679, "forward-loss:lenet": 0.34954583644866943,
         "forward-loss:mobilenetv3-small": 3.342491626739502,
         "large": 0.49444442987442017, "small:lenet": 0.5694444179534912, "small:mobilenetv3-small": 0.40833333134651184},
    ],
}


def _observed(line: dict) -> dict[str, float]:
    losses = {k: v for k, v in line.items() if k == "reverse-loss" or k.startswith("forward-loss:")}
    return {**losses, **{model: result["accuracy"] for model, result in line["eval"].items()}}


@pytest.mark.parametrize("mode", ["homogeneous", "heterogeneous"])
def test_two_rounds_of_koala_reproduce_the_recorded_losses_and_accuracies(tmp_path, mode: str) -> None:
    overrides = [*TWO_ROUNDS, *(HETEROGENEOUS if mode == "heterogeneous" else [])]
    result = run_local(load_config(BASE, overrides), tmp_path / mode, echo=lambda _: None)
    if mode == "heterogeneous":
        assert result.summary["small"] == {"lenet": 3, "mobilenetv3-small": 1}
    observed = [_observed(line) for line in result.metrics]
    assert [set(line) for line in observed] == [set(line) for line in RECORDED[mode]]
    for round_number, (got, recorded) in enumerate(zip(observed, RECORDED[mode])):
        for key, value in recorded.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"round {round_number}: {key}"
    assert observed[-1]["large"] > observed[0]["large"] + 0.3  # and the run learns
