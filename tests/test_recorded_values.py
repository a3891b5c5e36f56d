"""Two rounds of KOALA on digits, pinned to recorded values: a change in the mathematics (a loss, a
fusion weight, a seed stream, an order of summation) fails here even when the run still learns.

Recorded with one torch thread (torch 2.13.0 CPU) on each processor the project has run on: torch's
CPU kernels dispatch on the instruction set, and the same seed gives other values from round 1 on
another processor. A run must reproduce the values of one of them. A deliberate change of the
numbers records them anew on each, and says why in its commit; a new processor adds its own. On a
processor none of the records was made on (another CPU model or torch CPU capability), the test
still checks that the run learns, then skips with the values to record: its numbers cannot be known
in advance there, and a mismatch would say nothing about the code.
"""

import pytest
import torch
from helpers import BASE, DIGITS_KOALA

from koala.config import load_config
from koala.run.provenance import processor_name
from koala.run.launch import run_local

TWO_ROUNDS = [*DIGITS_KOALA, "rounds=2", "threads=1", "client.epochs=3", "distill.temperature=1.0",
              "distill.reverse.epochs=3"]
# three LeNet clients and one MobileNetV3-Small client: the sample-share fusion weighs unequal groups
HETEROGENEOUS = ["models.small=['lenet','mobilenetv3-small']", "models.small-shares=[0.75,0.25]",
                 "distill.fusion='sample-share'"]

RECORDED = {
    "homogeneous": {
        "the development machine (its processor was not recorded)": [
            {"large": 0.12222222238779068, "small:lenet": 0.12222222238779068},
            {"reverse-loss": 0.03264099359512329, "forward-loss:lenet": 0.022978097200393677,
             "large": 0.15833333134651184, "small:lenet": 0.4194444417953491},
            {"reverse-loss": 0.11452121287584305, "forward-loss:lenet": 0.0528513565659523,
             "large": 0.49166667461395264, "small:lenet": 0.5277777910232544},
        ],
        "AMD EPYC, AVX2": [
            {"large": 0.12222222238779068, "small:lenet": 0.12222222238779068},
            {"reverse-loss": 0.032649315893650055, "forward-loss:lenet": 0.02297089621424675,
             "large": 0.15833333134651184, "small:lenet": 0.4194444417953491},
            {"reverse-loss": 0.11439208686351776, "forward-loss:lenet": 0.050192516297101974,
             "large": 0.4888888895511627, "small:lenet": 0.519444465637207},
        ],
        # AMD EPYC, AVX512 reproduces the development machine's homogeneous rounds (not its heterogeneous ones)
    },
    "heterogeneous": {
        "the development machine (its processor was not recorded)": [
            {"large": 0.12222222238779068, "small:lenet": 0.12222222238779068,
             "small:mobilenetv3-small": 0.07500000298023224},
            {"reverse-loss": 0.03383529186248779, "forward-loss:lenet": 0.06616578996181488,
             "forward-loss:mobilenetv3-small": 1.3358938694000244, "large": 0.1805555522441864,
             "small:lenet": 0.3722222149372101, "small:mobilenetv3-small": 0.10277777910232544},
            {"reverse-loss": 0.2257702648639679, "forward-loss:lenet": 0.34954583644866943,
             "forward-loss:mobilenetv3-small": 3.342491626739502, "large": 0.49444442987442017,
             "small:lenet": 0.5694444179534912, "small:mobilenetv3-small": 0.40833333134651184},
        ],
        "AMD EPYC, AVX2": [
            {"large": 0.12222222238779068, "small:lenet": 0.12222222238779068,
             "small:mobilenetv3-small": 0.07500000298023224},
            {"reverse-loss": 0.04184678941965103, "forward-loss:lenet": 0.07606375217437744,
             "forward-loss:mobilenetv3-small": 1.3015514612197876, "large": 0.1805555522441864,
             "small:lenet": 0.3777777850627899, "small:mobilenetv3-small": 0.12222222238779068},
            {"reverse-loss": 0.23942163586616516, "forward-loss:lenet": 0.4313865303993225,
             "forward-loss:mobilenetv3-small": 2.72926926612854, "large": 0.5111111402511597,
             "small:lenet": 0.5888888835906982, "small:mobilenetv3-small": 0.4416666626930237},
        ],
        "AMD EPYC, AVX512": [
            {"large": 0.12222222238779068, "small:lenet": 0.12222222238779068,
             "small:mobilenetv3-small": 0.07500000298023224},
            {"reverse-loss": 0.051606763154268265, "forward-loss:lenet": 0.08410708606243134,
             "forward-loss:mobilenetv3-small": 1.02744460105896, "large": 0.18333333730697632,
             "small:lenet": 0.36666667461395264, "small:mobilenetv3-small": 0.12222222238779068},
            {"reverse-loss": 0.21445322036743164, "forward-loss:lenet": 0.48124808073043823,
             "forward-loss:mobilenetv3-small": 2.4509410858154297, "large": 0.5361111164093018,
             "small:lenet": 0.6416666507720947, "small:mobilenetv3-small": 0.3499999940395355},
        ],
    },
}


RECORDED_PROCESSORS = {"AMD EPYC, AVX2", "AMD EPYC, AVX512"}
"""The processors above as 'CPU MODEL, TORCH CPU CAPABILITY', what a run directory's environment.json
records as "cpu" and "cpu-capability" (the development machine's was not recorded; the AVX512 one
reproduces its homogeneous rounds)."""


def _first_mismatch(observed: list[dict[str, float]], recorded: list[dict[str, float]]) -> str | None:
    """Where `observed` first departs from one processor's `recorded` rounds, or None where it does not."""
    if [set(line) for line in observed] != [set(line) for line in recorded]:
        return f"other metrics: {[sorted(line) for line in observed]}"
    for round_number, (got, expected) in enumerate(zip(observed, recorded, strict=True)):
        for key, value in expected.items():
            if got[key] != pytest.approx(value, rel=1e-5, abs=1e-7):
                return f"round {round_number}: {key} {got[key]!r}, recorded {value!r}"
    return None


def _observed(line: dict) -> dict[str, float]:
    """The losses and the large and small models' accuracies; the averaged models ("averaged:ARCH",
    evaluated since the records were made) are left out: tests/test_koala.py checks them."""
    losses = {k: v for k, v in line.items() if k == "reverse-loss" or k.startswith("forward-loss:")}
    return {**losses, **{model: result["accuracy"] for model, result in line["eval"].items() if not model.startswith("averaged:")}}


@pytest.mark.parametrize("mode", ["homogeneous", "heterogeneous"])
def test_two_rounds_of_koala_reproduce_the_recorded_losses_and_accuracies(tmp_path, mode: str) -> None:
    overrides = [*TWO_ROUNDS, *(HETEROGENEOUS if mode == "heterogeneous" else [])]
    result = run_local(load_config(BASE, overrides), tmp_path / mode, echo=lambda _: None)
    if mode == "heterogeneous":
        assert result.summary["small"] == {"lenet": 3, "mobilenetv3-small": 1}
    observed = [_observed(line) for line in result.metrics]
    assert observed[-1]["large"] > observed[0]["large"] + 0.3  # the run learns, on any processor
    mismatches = {processor: _first_mismatch(observed, recorded) for processor, recorded in RECORDED[mode].items()}
    if None in mismatches.values():
        return
    processor = f"{processor_name()}, {torch.backends.cpu.get_cpu_capability()}"
    if processor not in RECORDED_PROCESSORS:
        pytest.skip(f"no values recorded on this processor ({processor}; recorded: {sorted(RECORDED_PROCESSORS)}): "
                    f"record its values in RECORDED[{mode!r}]: {observed}")
    pytest.fail(f"no processor's recorded values reproduced on this recorded processor ({processor}): "
                f"{mismatches}; this processor's values: {observed}")
