"""Model zoo: shapes, recorded parameter counts, weight round trips and the registry's errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from koala.errors import ModelError
from koala.models import (
    InputSpec,
    build_model,
    count_parameters,
    model_entry,
    model_names,
)

MNIST = InputSpec(channels=1, image_size=28, num_classes=10)
CIFAR = InputSpec(channels=3, image_size=32, num_classes=10)
SPECS = [pytest.param(MNIST, id="1x28x28"), pytest.param(CIFAR, id="3x32x32")]

# Recorded parameter counts: (1x28x28, 10 classes), (3x32x32, 10 classes).
PARAMETERS: dict[str, tuple[int, int]] = {
    "lenet": (105_866, 136_874),
    "lenet-narrow": (26_698, 34_522),  # by hand: 80 + 1,168 + 25,120 + 330 at 1x28x28
    "lenet-wide": (421_642, 545_098),  # by hand: 320 + 18,496 + 401,536 + 1,290
    "shufflenetv2-0.5-ds": (351_610, 352_042),  # the stem's stride changes no weight
    "mobilenetv2": (2_236_106, 2_236_682),
    "mobilenetv3-small": (1_527_818, 1_528_106),
    "shufflenetv2": (1_263_422, 1_263_854),
    "shufflenetv2-0.5": (351_610, 352_042),
    "vgg11": (9_229_962, 9_231_114),
    "vgg16": (14_727_114, 14_728_266),
    "vgg19": (20_039_370, 20_040_522),
    "resnet18": (11_172_810, 11_173_962),
    "resnet34": (21_280_970, 21_282_122),
    "resnet18-ds": (11_172_810, 11_173_962),
    "resnet34-ds": (21_280_970, 21_282_122),
}
SMALL_IMAGE_MODELS = sorted(PARAMETERS)

# torchvision's published parameter counts of the ImageNet models (3x224x224, 1000 classes).
IMAGENET = InputSpec(channels=3, image_size=224, num_classes=1000)
IMAGENET_PARAMETERS = {
    "vgg19-imagenet": 143_667_240,
    "resnet18-imagenet": 11_689_512,
    "mobilenetv2-imagenet": 3_504_872,
    "mobilenetv3-small-imagenet": 2_542_856,
    "shufflenetv2-imagenet": 2_278_604,
    "shufflenetv2-1.5-imagenet": 3_503_624,
    "shufflenetv2-2.0-imagenet": 7_393_996,
}


def _build(name: str, spec: InputSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, spec)


def _batch(spec: InputSpec, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, spec.channels, spec.image_size, spec.image_size, generator=generator)


def test_every_model_has_a_recorded_count():
    assert set(model_names()) == set(PARAMETERS) | set(IMAGENET_PARAMETERS)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", SMALL_IMAGE_MODELS)
def test_output_shape_and_parameter_count(name: str, spec: InputSpec):
    model = _build(name, spec)
    assert count_parameters(model) == PARAMETERS[name][0 if spec is MNIST else 1]
    x = _batch(spec)
    model.train()
    assert model(x).shape == (2, spec.num_classes)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, spec.num_classes)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", SMALL_IMAGE_MODELS)
def test_state_dict_round_trip(name: str, spec: InputSpec, tmp_path):
    model = _build(name, spec, seed=0)
    with torch.no_grad():
        model.train()(_batch(spec, seed=2))  # move the BatchNorm running statistics off their defaults
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))

    restored = _build(name, spec, seed=1)
    restored.load_state_dict(load_file(str(path)))
    model.eval()
    restored.eval()
    x = _batch(spec)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", model_names())
def test_builds_on_the_meta_device(name: str):
    with torch.device("meta"):
        model = build_model(name, CIFAR)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", sorted(set(model_names("small")) & set(SMALL_IMAGE_MODELS)))
def test_small_models_backpropagate(name: str, spec: InputSpec):
    model = _build(name, spec)
    model.train()
    labels = torch.tensor([0, spec.num_classes - 1])
    loss = torch.nn.functional.cross_entropy(model(_batch(spec)), labels)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_roles():
    assert set(model_names("small")) == {
        "lenet", "lenet-narrow", "lenet-wide", "mobilenetv2", "mobilenetv3-small", "shufflenetv2", "shufflenetv2-0.5",
        "shufflenetv2-0.5-ds",
        "mobilenetv2-imagenet", "mobilenetv3-small-imagenet", "shufflenetv2-imagenet", "shufflenetv2-1.5-imagenet",
        "shufflenetv2-2.0-imagenet",
    }
    assert set(model_names("large")) == set(model_names()) - set(model_names("small"))
    assert all(model_entry(name).description for name in model_names())


def test_unknown_name_lists_models_and_suggests_close_match():
    with pytest.raises(ModelError) as info:
        build_model("resnet-18", MNIST)
    message = str(info.value)
    assert "Did you mean 'resnet18'?" in message
    assert all(name in message for name in model_names())


def test_unknown_name_without_close_match():
    with pytest.raises(ModelError, match="Known models: "):
        model_entry("transformer-xxl")


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAMETERS))
def test_imagenet_variants_match_torchvision(name: str):
    with torch.device("meta"):  # VGG-19 has 143M parameters: count and run it without allocating any
        model = build_model(name, IMAGENET)
        logits = model.eval()(torch.empty(2, 3, 224, 224))
    assert count_parameters(model) == IMAGENET_PARAMETERS[name]
    assert logits.shape == (2, 1000)


def test_vgg_skips_pools_on_a_1x1_map():
    pools = [m for m in build_model("vgg11", MNIST).features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 4  # 28 -> 14 -> 7 -> 3 -> 1, the fifth pool is skipped
    pools = [m for m in build_model("vgg11", CIFAR).features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 5


def test_small_models_train_in_channels_last_and_hand_back_contiguous_weights() -> None:
    import torch.nn.functional as F

    from koala.weights import initial_state, instantiate, module_state

    spec = InputSpec(1, 28, 10)
    for name, layout in (("lenet", torch.channels_last), ("resnet18-ds", torch.contiguous_format)):
        model = instantiate(name, spec, initial_state(name, spec, 0), "cpu")
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=layout)
        assert all(t.is_contiguous() for t in module_state(model).values())
    # the same SGD steps in either layout give the same weights within float tolerance
    state = initial_state("lenet", spec, 0)
    images, labels = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10
    results = []
    for channels_last in (False, True):
        model = instantiate("lenet", spec, state, "cpu")
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        results.append(module_state(model))
    assert all(torch.allclose(results[0][k], results[1][k], atol=2e-4) for k in state)  # measured: 4.4e-5
    assert any(not torch.equal(results[0][k], state[k]) for k in state)


def test_the_small_model_ladder_spans_under_2_to_over_50_training_mflops() -> None:
    from koala.accounting.measure import CostTable

    costs = CostTable(InputSpec(1, 28, 10), 64, momentum=True)
    flops = {name: costs[name].train_flops_per_sample / 1e6 for name in
             ("lenet-narrow", "lenet", "lenet-wide", "shufflenetv2-0.5-ds", "shufflenetv2-0.5")}
    assert flops["lenet-narrow"] < 2 < flops["lenet"] < flops["shufflenetv2-0.5-ds"] < flops["lenet-wide"]
    assert flops["shufflenetv2-0.5"] > 50
    assert flops["shufflenetv2-0.5-ds"] < flops["shufflenetv2-0.5"] / 3  # the stride-2 stem quarters the cost
