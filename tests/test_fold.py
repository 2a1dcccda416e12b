"""BatchNorm folding: which BatchNorms fold (read off the traced program), the folded arithmetic against NumPy, and
folded outputs equal to the unfolded ones, dense, slimmed, on a zoo ResNet and on a user's own module."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from agmc_jax.graph import trace
from agmc_jax.models import create_model
from agmc_jax.prune import Folded, fold_batchnorm, fold_pairs, masks_from_vectors, slim, top_channels

IMAGES = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)


def random_variables(module, shape, seed=1):
    """Variables shaped like `module.init`'s, drawn in NumPy (nothing compiled): BatchNorm statistics, scales and
    shifts far from their initial 0/1, else folding would be the identity on them."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, *shape), np.float32)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            return rng.uniform(0.3, 2.0, leaf.shape).astype(np.float32)
        scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.5
        return rng.normal(0.0, scale, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def outputs(module, variables, **kwargs):
    return jax.jit(lambda v, x: module.apply(v, x, **kwargs))(variables, IMAGES)


class UserNet(nn.Module):
    """A conv with bias and one without, each before a BatchNorm (both fold); a depthwise conv before a BatchNorm
    (folds); a BatchNorm after a residual add, and one after a conv whose output is also read elsewhere (neither
    folds)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda: nn.BatchNorm(use_running_average=not train, epsilon=1e-3)  # noqa: E731
        y = nn.relu(norm()(nn.Conv(6, (3, 3), use_bias=True)(x)))
        y = norm()(nn.Conv(6, (3, 3), use_bias=False)(y))
        y = nn.relu(norm()(nn.Conv(6, (3, 3), feature_group_count=6, use_bias=False)(y)))
        z = norm()(y + nn.Conv(6, (1, 1))(y))
        shared = nn.Conv(6, (3, 3), use_bias=False)(z)
        z = norm()(shared) + shared
        return nn.Dense(4)(z.mean(axis=(1, 2)))


def test_user_module_folds_exactly_the_conv_batchnorm_pairs():
    module = UserNet()
    variables = random_variables(module, IMAGES.shape[1:])
    net = trace(module, variables, IMAGES.shape[1:])
    pairs = {(conv, norm) for conv, norm, _ in fold_pairs(net)}
    assert pairs == {(("Conv_0",), ("BatchNorm_0",)), (("Conv_1",), ("BatchNorm_1",)),
                     (("Conv_2",), ("BatchNorm_2",))}
    assert {eps for _, _, eps in fold_pairs(net)} == {1e-3}
    folded_module, folded = fold_batchnorm(net, variables)
    assert set(folded["batch_stats"]) == {"BatchNorm_3", "BatchNorm_4"}  # the two that stay
    assert folded["params"]["Conv_1"]["bias"].shape == (6,)  # a conv without bias gains one
    np.testing.assert_allclose(outputs(folded_module, folded), outputs(module, variables), rtol=1e-4, atol=1e-4)


def test_folded_kernel_and_bias_are_the_batchnorm_affine_map():
    module = UserNet()
    variables = random_variables(module, IMAGES.shape[1:])
    _, folded = fold_batchnorm(trace(module, variables, IMAGES.shape[1:]), variables)
    conv, stats = variables["params"]["Conv_0"], variables["batch_stats"]["BatchNorm_0"]
    norm = variables["params"]["BatchNorm_0"]
    factor = np.float64(norm["scale"]) / np.sqrt(np.float64(stats["var"]) + 1e-3)
    np.testing.assert_allclose(folded["params"]["Conv_0"]["kernel"], np.float64(conv["kernel"]) * factor, rtol=1e-6)
    np.testing.assert_allclose(folded["params"]["Conv_0"]["bias"],
                               (conv["bias"] - np.float64(stats["mean"])) * factor + norm["bias"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def resnet():
    module = create_model("resnet20", 10, widths=(8, 16, 16))
    variables = random_variables(module, (8, 8, 3))
    return module, variables, trace(module, variables, (8, 8, 3))


def test_zoo_resnet_folds_every_convolution(resnet):
    module, variables, net = resnet
    folded_module, folded = fold_batchnorm(net, variables)
    assert len(fold_pairs(net)) == sum(layer.kind == "conv" for layer in net.layers) == 21
    assert "batch_stats" not in folded and isinstance(folded_module, Folded)
    np.testing.assert_allclose(outputs(folded_module, folded, train=False), outputs(module, variables, train=False),
                               rtol=1e-4, atol=1e-4)


def test_slimmed_and_folded_network_computes_the_masked_one(resnet):
    module, variables, net = resnet
    counts = np.array([4] * 4 + [8] * 8)
    masks = masks_from_vectors(net, top_channels(net, variables, counts))
    masked = jax.tree.map(lambda v, m: v * m.astype(v.dtype), variables, masks)
    slim_module, small = slim(net, variables, masks)
    slim_net = trace(slim_module, small, (8, 8, 3))
    folded_module, folded = fold_batchnorm(slim_net, small)
    assert folded["params"]["ConvBN_0"]["Conv_0"]["kernel"].shape == (3, 3, 3, 4)
    assert trace(folded_module, folded, (8, 8, 3)).macs == slim_net.macs == net.cost(counts)[0]
    np.testing.assert_allclose(outputs(folded_module, folded, train=False), outputs(module, masked, train=False),
                               rtol=1e-4, atol=1e-4)
