"""Model zoo: shapes, recorded parameter counts, weight round trips and the registry's errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from koala.errors import ModelError
from koala.models import InputSpec, build_model, count_parameters, model_entry, model_names
from koala.models.mobilenetv3 import MobileNetV3Small
from koala.models.resnet import LAYERS_18, ResNet
from koala.models.shufflenetv2 import ShuffleNetV2
from koala.models.vgg import VGG

MNIST = InputSpec(channels=1, image_size=28, num_classes=10)
CIFAR = InputSpec(channels=3, image_size=32, num_classes=10)
SPECS = [pytest.param(MNIST, id="1x28x28"), pytest.param(CIFAR, id="3x32x32")]

# Recorded parameter counts: (1x28x28, 10 classes), (3x32x32, 10 classes).
PARAMETERS: dict[str, tuple[int, int]] = {
    "lenet": (105_866, 136_874),
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


def _build(name: str, spec: InputSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, spec)


def _batch(spec: InputSpec, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, spec.channels, spec.image_size, spec.image_size, generator=generator)


def test_every_model_has_a_recorded_count():
    assert set(model_names()) == set(PARAMETERS)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", model_names())
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
@pytest.mark.parametrize("name", model_names())
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
@pytest.mark.parametrize("name", model_names("small"))
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
    assert set(model_names("small")) == {"lenet", "mobilenetv3-small", "shufflenetv2", "shufflenetv2-0.5"}
    assert set(model_names("large")) == set(PARAMETERS) - set(model_names("small"))
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


# The ImageNet variants a later issue registers must match torchvision's parameter counts.


def test_mobilenetv3_small_imagenet_count():
    assert count_parameters(MobileNetV3Small(3, 1000, stem_stride=2)) == 2_542_856


def test_shufflenetv2_imagenet_count():
    assert count_parameters(ShuffleNetV2(3, 1000, stem="imagenet")) == 2_278_604


def test_vgg19_imagenet_count():
    with torch.device("meta"):  # 143M parameters: count them without allocating or initialising
        model = VGG("E", InputSpec(3, 224, 1000), batch_norm=False, head="imagenet")
    assert count_parameters(model) == 143_667_240


def test_resnet18_imagenet_count():
    assert count_parameters(ResNet(LAYERS_18, 3, 1000, stem="imagenet")) == 11_689_512


def test_vgg_skips_pools_on_a_1x1_map():
    pools = [m for m in build_model("vgg11", MNIST).features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 4  # 28 -> 14 -> 7 -> 3 -> 1, the fifth pool is skipped
    pools = [m for m in build_model("vgg11", CIFAR).features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 5
