"""The model zoo: parameter and MAC counts against published figures and an analytic count.

Counts come from `agmc_jax.graph.trace` at batch 1 on abstract variables (`jax.eval_shape`), so
nothing here compiles or runs a network. MACs are multiply-accumulates of conv and dense layers.
"""
import functools

import jax
import numpy as np
import pytest

from agmc_jax.graph import trace
from agmc_jax.models import MODELS, create_model, init_model

M, G = 1e6, 1e9

# (model, keyword arguments, input shape, classes, published parameters, published MACs)
PUBLISHED = [
    ("resnet20", {}, (32, 32, 3), 10, 0.27 * M, 41 * M),  # He et al. 2016, Table 6
    ("resnet56", {}, (32, 32, 3), 10, 0.85 * M, 125 * M),  # AMC, AGMC
    ("vgg16", {}, (32, 32, 3), 10, 15 * M, 313 * M),  # CIFAR VGG-16 (BN, one linear classifier)
    ("mobilenet_v1", {}, (224, 224, 3), 1000, 4.2 * M, 569 * M),  # Howard et al. 2017, Table 8
    ("mobilenet_v2", {}, (224, 224, 3), 1000, 3.5 * M, 300 * M),  # Sandler et al. 2018, Table 3
    ("mobilenet_v2", {"width": 0.5}, (224, 224, 3), 1000, 1.95 * M, 97 * M),  # ibid., width 0.5
    ("resnet18", {}, (224, 224, 3), 1000, 11.7 * M, 1.8 * G),  # torchvision / He et al.
    ("resnet50", {}, (224, 224, 3), 1000, 25.6 * M, 4.1 * G),
]


def abstract_variables(module, input_shape):
    """Variables as ShapeDtypeStructs: the tree `init_model` would return, without computing it."""
    return jax.eval_shape(lambda: init_model(module, input_shape))


@functools.lru_cache(maxsize=None)
def _traced(name, input_shape, num_classes, kwargs):
    module = create_model(name, num_classes, **dict(kwargs))
    variables = abstract_variables(module, input_shape)
    return module, variables, trace(module, variables, input_shape)


def traced(name, input_shape, num_classes=None, **kwargs):
    """(module, abstract variables, traced network); each configuration is traced once per session."""
    return _traced(name, tuple(input_shape), num_classes, tuple(sorted(kwargs.items())))



def param_count(variables):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name,kwargs,shape,classes,params,macs", PUBLISHED,
                         ids=[f"{p[0]}{'-' + str(p[1]['width']) if p[1] else ''}" for p in PUBLISHED])
def test_counts_match_published_figures(name, kwargs, shape, classes, params, macs):
    assert MODELS[name].input_shape == shape and MODELS[name].num_classes == classes
    _, variables, net = traced(name, shape, **kwargs)
    assert net.params == pytest.approx(params, rel=0.02)
    assert net.macs == pytest.approx(macs, rel=0.02)
    assert net.params == param_count(variables)
    assert net.macs == sum(layer.macs for layer in net.layers)


def resnet_cifar_macs(depth, num_classes=10, size=32, widths=(16, 32, 64)):
    """Sum over convolutions of k*k*c_in*c_out*H_out*W_out, plus the dense layer's c_in*classes."""
    n = (depth - 2) // 6
    macs = 3 * 3 * 3 * widths[0] * size * size  # stem
    c_in, hw = widths[0], size
    for stage, width in enumerate(widths):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            hw_out = hw // stride
            macs += 3 * 3 * c_in * width * hw_out * hw_out  # first 3x3 conv (strided)
            macs += 3 * 3 * width * width * hw_out * hw_out  # second 3x3 conv
            if stride == 2:
                macs += 1 * 1 * c_in * width * hw_out * hw_out  # 1x1 projection shortcut
            c_in, hw = width, hw_out
    return macs + c_in * num_classes


def resnet_cifar_params(depth, num_classes=10, widths=(16, 32, 64)):
    """Kernels, BatchNorm scale+shift per conv, dense kernel+bias."""
    n = (depth - 2) // 6
    params = 3 * 3 * 3 * widths[0] + 2 * widths[0]
    c_in = widths[0]
    for stage, width in enumerate(widths):
        for block in range(n):
            params += 9 * c_in * width + 2 * width + 9 * width * width + 2 * width
            if stage > 0 and block == 0:
                params += c_in * width + 2 * width
            c_in = width
    return params + c_in * num_classes + num_classes


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_resnet_cifar_counts_equal_analytic_formula(depth):
    _, variables, net = traced(f"resnet{depth}", (32, 32, 3))
    assert net.macs == resnet_cifar_macs(depth)
    assert net.params == resnet_cifar_params(depth) == param_count(variables)


def test_resnet20_exact_figures():
    _, _, net = traced("resnet20", (32, 32, 3))
    assert (net.params, net.macs) == (272_474, 40_813_184)
    convs = [l for l in net.layers if l.kind == "conv"]
    assert len(convs) == 21 and [l.kind for l in net.layers].count("dense") == 1
    assert sum(l.kernel_size == (1, 1) for l in convs) == 2  # the two projection shortcuts


def test_lenet5_with_three_input_channels_and_other_input_size():
    _, _, gray = traced("lenet5", (28, 28, 1))
    _, _, color = traced("lenet5", (28, 28, 3))
    # Only the first convolution sees the input channels: 5*5*(3-1)*6 per output pixel, 28x28 'SAME'.
    assert color.macs - gray.macs == 5 * 5 * 2 * 6 * 28 * 28
    assert color.params - gray.params == 5 * 5 * 2 * 6
    assert color.layers[0].in_channels == 3 and gray.layers[0].in_channels == 1
    # 28x28: 'SAME' 5x5 -> 28, pool -> 14, 'VALID' 5x5 -> 10, pool -> 5: the flatten gives 5*5*16.
    assert gray.layers[2].kind == "dense" and gray.layers[2].in_channels == 5 * 5 * 16
    _, _, big = traced("lenet5", (32, 32, 1))  # 32 -> 16 -> 12 -> 6: 6*6*16 inputs to the first dense layer
    assert big.layers[2].in_channels == 6 * 6 * 16
    assert big.params - gray.params == (6 * 6 - 5 * 5) * 16 * 120
    assert gray.macs == (5 * 5 * 1 * 6 * 28 * 28 + 5 * 5 * 6 * 16 * 10 * 10
                         + 400 * 120 + 120 * 84 + 84 * 10)


def test_resnet20_with_100_classes():
    _, _, ten = traced("resnet20", (32, 32, 3))
    _, variables, hundred = traced("resnet20", (32, 32, 3), num_classes=100)
    dense = hundred.layers[-1]
    assert dense.kind == "dense" and dense.out_channels == 100 and dense.in_channels == 64
    assert hundred.macs - ten.macs == 64 * 90
    assert hundred.params - ten.params == 65 * 90
    assert hundred.macs == resnet_cifar_macs(20, 100)
    assert variables["params"]["Dense_0"]["kernel"].shape == (64, 100)


def test_macs_scale_with_input_resolution():
    _, _, at32 = traced("resnet20", (32, 32, 3))
    _, _, at16 = traced("resnet20", (16, 16, 3))
    conv = at32.macs - 64 * 10
    assert at16.macs - 64 * 10 == conv // 4
    assert at16.macs == resnet_cifar_macs(20, size=16)
    assert at16.params == at32.params
