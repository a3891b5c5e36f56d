"""Model zoo: importing this package registers every model with the registry."""

from koala.models import lenet, mobilenetv2, mobilenetv3, resnet, shufflenetv2, vgg  # noqa: F401  (registration)
from koala.models.registry import (
    InputSpec,
    build_model,
    count_parameters,
    model_entry,
    model_names,
)

__all__ = ["InputSpec", "build_model", "count_parameters", "model_entry", "model_names"]
