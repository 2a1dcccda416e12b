"""The model zoo: a registry from names to Linen modules, their standard input and smallest input."""
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from agmc_jax.errors import InputShapeError, UnknownModelError
from agmc_jax.models.lenet import LeNet5
from agmc_jax.models.mobilenet import MobileNetV1, MobileNetV2
from agmc_jax.models.resnet import ResNetCifar, ResNetImageNet
from agmc_jax.models.vgg import VGG


class ModelSpec(NamedTuple):
    """How to build a zoo model and which inputs it takes."""

    build: callable
    input_shape: tuple  # standard (H, W, C)
    num_classes: int  # standard number of classes
    min_size: int  # smallest H and W the network's downsampling leaves at least 1x1


MODELS = {
    "lenet5": ModelSpec(LeNet5, (28, 28, 1), 10, 12),
    "resnet20": ModelSpec(lambda **k: ResNetCifar(depth=20, **k), (32, 32, 3), 10, 4),
    "resnet32": ModelSpec(lambda **k: ResNetCifar(depth=32, **k), (32, 32, 3), 10, 4),
    "resnet56": ModelSpec(lambda **k: ResNetCifar(depth=56, **k), (32, 32, 3), 10, 4),
    "vgg16": ModelSpec(VGG, (32, 32, 3), 10, 32),
    "mobilenet_v1": ModelSpec(MobileNetV1, (224, 224, 3), 1000, 32),
    "mobilenet_v2": ModelSpec(MobileNetV2, (224, 224, 3), 1000, 32),
    "resnet18": ModelSpec(lambda **k: ResNetImageNet((2, 2, 2, 2), False, **k), (224, 224, 3), 1000, 32),
    "resnet50": ModelSpec(lambda **k: ResNetImageNet((3, 4, 6, 3), True, **k), (224, 224, 3), 1000, 32),
}


def register_model(name: str, spec: ModelSpec) -> None:
    """Add (or replace) the model `name`: training, search and every saved network rebuild it by that name."""
    if not isinstance(spec, ModelSpec):
        raise UnknownModelError(f"register_model takes a ModelSpec, got {type(spec).__name__}")
    MODELS[name] = spec


def model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or an `UnknownModelError` listing the known names."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def create_model(name: str, num_classes: int | None = None, **kwargs):
    """A zoo module by name (e.g. `create_model('mobilenet_v1', 10, width=0.5)`)."""
    spec = model_spec(name)
    if num_classes is not None and num_classes < 1:
        raise InputShapeError(f"--classes must be at least 1, got {num_classes}")
    return spec.build(num_classes=num_classes or spec.num_classes, **kwargs)


def check_input_shape(name: str, input_shape: Sequence[int]) -> tuple:
    """The (H, W, C) input shape, validated against what the network can downsample."""
    shape = tuple(int(s) for s in input_shape)
    spec = model_spec(name)
    if len(shape) != 3 or min(shape) < 1:
        raise InputShapeError(f"input shape must be H,W,C with positive sizes, got {shape}")
    if min(shape[:2]) < spec.min_size:
        raise InputShapeError(f"{name} needs inputs of at least {spec.min_size}x{spec.min_size}, got "
                              f"{shape[0]}x{shape[1]}")
    return shape


@partial(jax.jit, static_argnums=(0, 1, 2))
def _init(module, input_shape, seed):
    return module.init(jax.random.key(seed), jnp.zeros((1, *input_shape), jnp.float32), train=False)


def init_model(module, input_shape: Sequence[int], seed: int = 0):
    """Variables (`params`, `batch_stats`) of `module` for one NHWC input of `input_shape` (compiled once)."""
    return _init(module, tuple(int(s) for s in input_shape), int(seed))


__all__ = ["MODELS", "ModelSpec", "model_spec", "register_model", "create_model", "check_input_shape", "init_model",
           "LeNet5", "ResNetCifar", "ResNetImageNet", "VGG", "MobileNetV1", "MobileNetV2"]
