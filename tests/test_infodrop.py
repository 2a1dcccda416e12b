"""Information dropout: the noise and its KL against NumPy, noise off at evaluation, training through
`train_step`, channels no layer reads ranked last (where weight norms rank them first), the criterion inside
the compiled environment, and element-wise importance.

One small conv net throughout: Conv(6) -> pool -> Conv(8) -> flatten -> Dense(4) on 8x8 images, where
channels 1 and 4 of the first conv are read by nothing (their rows of the next kernel are zero) and
channels 2 and 5 of the second neither (their dense rows are zero); both pairs get the largest producing
weights, so L2 ranks them first.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmc_jax.env import EnvConfig, Environment
from agmc_jax.errors import MaskError
from agmc_jax.graph import trace
from agmc_jax.kinds import Channels
from agmc_jax.prune import (InfoDropConfig, channel_masks, channel_ranks, fit_alphas, information_dropout,
                            layer_alphas, split_variables, vectors_from_masks, weight_importance, weight_masks)
from agmc_jax.train import LOSSES, OptimizerSpec, TrainConfig, learning_rate_schedule, state_from_variables, train_step
from realistic import realistic

USELESS = ([1, 4], [2, 5])  # per channel group: the channels no later layer reads


class Small(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(4)(x.reshape((x.shape[0], -1)))


@functools.lru_cache(maxsize=None)
def small():
    """(module, variables, traced net, 64 images): the channels of USELESS are read by nothing."""
    module = Small()
    params = realistic(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1))))["params"]
    first, second = USELESS
    params["Conv_0"]["kernel"][..., first] *= 3
    params["Conv_1"]["kernel"][:, :, first, :] = 0
    params["Conv_1"]["kernel"][..., second] *= 3
    dense = params["Dense_0"]["kernel"].reshape(4, 4, 8, 4)  # flattened (h, w, channel)
    dense[:, :, second, :] = 0
    params["Dense_0"]["kernel"] = dense.reshape(128, 4) * 4  # confident predictions
    variables = {"params": params}
    images = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(np.float32)
    return module, variables, trace(module, variables, (8, 8, 1)), images


def logits_of(rho, alpha_max=0.7):
    return np.log(rho / (alpha_max - rho))


def test_channels_no_layer_reads_rank_last_where_weight_norms_rank_them_first():
    module, variables, net, images = small()
    infodrop = channel_ranks(net, variables, "infodrop", images)
    l2 = channel_ranks(net, variables, "l2")
    for group, useless in enumerate(USELESS):
        size = net.group_sizes[group]
        assert sorted(np.flatnonzero(infodrop[group] >= size - 2)) == useless
        assert set(l2[group][useless]) == {0, 1}
    alphas = fit_alphas(net, variables, images)
    useful = np.setdiff1d(np.arange(6), USELESS[0])
    assert alphas["Conv_1"][USELESS[0]].min() > 0.6 > alphas["Conv_1"][useful].max()


def test_kl_term_against_numpy_and_noise_off_at_evaluation():
    module, variables, net, images = small()
    config = InfoDropConfig(beta=0.01)
    wrapped_module, wrapped = information_dropout(net, variables, config)
    rng = np.random.default_rng(1)
    rho = {"Conv_1": rng.normal(size=6).astype(np.float32), "Dense_0": rng.normal(size=8).astype(np.float32)}
    wrapped = {**wrapped, "params": {**wrapped["params"], "infodrop": rho}}
    alpha = {name: 0.7 / (1 + np.exp(-r.astype(np.float64))) for name, r in rho.items()}
    # the units each site reads, one by one: Conv_1 reads 4x4 positions of 6 channels; Dense_0 reads the
    # 128 flattened features, feature f belonging to channel f % 8
    units = [-np.log(alpha["Conv_1"][c]) for _ in range(16) for c in range(6)]
    units += [-np.log(alpha["Dense_0"][f % 8]) for f in range(128)]
    x = images[:5]
    noisy, updates = jax.jit(functools.partial(wrapped_module.apply, noise=True, mutable=["batch_stats", LOSSES]))(
        wrapped, x)
    (kl,) = jax.tree.leaves(updates[LOSSES])
    np.testing.assert_allclose(float(kl), 0.01 * np.sum(units), rtol=1e-5)
    plain = np.asarray(jax.jit(module.apply)(variables, x))
    np.testing.assert_array_equal(np.asarray(jax.jit(wrapped_module.apply)(wrapped, x)), plain)
    assert np.abs(np.asarray(noisy) - plain).max() > 1e-3
    assert not np.array_equal(updates["batch_stats"]["infodrop"], wrapped["batch_stats"]["infodrop"])


class Chain(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4, use_bias=False)(x)
        return nn.Dense(4, use_bias=False)(x)


def test_the_noise_is_log_normal_with_the_learned_scale():
    module = Chain()
    identity = {"kernel": np.eye(4, dtype=np.float32)}
    variables = {"params": {"Dense_0": identity, "Dense_1": identity}}
    net = trace(module, variables, np.zeros((1, 4), np.float32))
    wrapped_module, wrapped = information_dropout(net, variables)
    scales = np.array([0.05, 0.2, 0.4, 0.69])
    wrapped["params"]["infodrop"] = {"Dense_1": logits_of(scales).astype(np.float32)}
    outputs, _ = wrapped_module.apply(wrapped, np.ones((20000, 4), np.float32), noise=True, mutable=["batch_stats"])
    logs = np.log(np.asarray(outputs, np.float64))  # Dense_1 reads ones * eps: log eps ~ N(0, alpha^2)
    np.testing.assert_allclose(logs.std(0), scales, rtol=0.03)
    np.testing.assert_allclose(logs.mean(0), 0, atol=4 * 0.69 / np.sqrt(20000))


def test_the_wrapped_network_trains_through_train_step_with_the_kl_in_its_loss():
    module, variables, net, images = small()
    beta = 0.01
    wrapped_module, wrapped = information_dropout(net, variables, InfoDropConfig(beta=beta))
    spec = OptimizerSpec(0.1, 0.9, 5e-4, "cosine", 0, 100)
    state = state_from_variables(wrapped, TrainConfig(model="lenet5", dataset="fashion_mnist"))
    labels = np.argmax(np.asarray(module.apply(variables, images[:16])), -1)
    step = jax.jit(train_step, static_argnums=(0, 1))
    new, metrics = step(wrapped_module, spec, state, {"image": images[:16], "label": labels})
    assert int(metrics["count"]) == 16
    rate = float(learning_rate_schedule(spec)(0))
    # a channel no layer reads has no cross-entropy gradient: its first SGD step is the KL's alone,
    # -lr * d(beta * units * -log(alpha_max * sigmoid(rho)))/d rho = lr * beta * units * (1 - sigmoid(rho))
    for site, useless in (("Conv_1", USELESS[0]), ("Dense_0", USELESS[1])):
        before = np.asarray(state.params["infodrop"][site], np.float64)
        moved = np.asarray(new.params["infodrop"][site], np.float64) - before
        kl_only = rate * beta * 16 * (1 - 1 / (1 + np.exp(-before)))  # 16 units read each channel per example
        np.testing.assert_allclose(moved[useless], kl_only[useless], rtol=1e-4)
        useful = np.setdiff1d(np.arange(len(before)), useless)
        assert np.abs(moved[useful] - kl_only[useful]).max() > 1e-3 * kl_only.max()
    assert not np.array_equal(new.params["Conv_0"]["kernel"], state.params["Conv_0"]["kernel"])
    trained = {"params": new.params, "batch_stats": new.batch_stats}
    own, rho = split_variables(trained)
    assert set(own) == {"params"} and jax.tree.structure(own) == jax.tree.structure(variables)
    assert set(rho) == {"Conv_1", "Dense_0"}
    sigmoid = {site: 1 / (1 + np.exp(-np.asarray(r, np.float64))) for site, r in rho.items()}
    alphas = layer_alphas(net, rho, 0.7)  # per input feature: Dense_0's feature f reads channel f % 8
    np.testing.assert_allclose(alphas["Conv_1"], 0.7 * sigmoid["Conv_1"], rtol=1e-6)
    np.testing.assert_allclose(alphas["Dense_0"], np.tile(0.7 * sigmoid["Dense_0"], 16), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(wrapped_module.apply(trained, images[:4])),
                                  np.asarray(module.apply(own, images[:4])))


def test_the_compiled_environment_prunes_by_infodrop():
    module, variables, net, images = small()
    labels = np.argmax(np.asarray(module.apply(variables, images)), -1)
    config = EnvConfig(criterion="infodrop", target_macs=0.9, calibration_images=64, recalibrate_bn=False)
    env = Environment(Channels(net, config), variables, images, labels, config)
    ranks = channel_ranks(net, variables, "infodrop", images)
    for prepared, expected in zip(jax.device_get(env.data["kind"]["ranks"]), ranks):
        np.testing.assert_array_equal(prepared, expected)
    counts = np.array(net.group_sizes) - 2
    _, masks = env.pruned(counts)
    for vector, useless in zip(vectors_from_masks(net, masks), USELESS):
        assert np.flatnonzero(~vector).tolist() == useless
    assert env.accuracy(counts[None])[0] == 1.0  # what no layer reads changes no prediction
    assert env.accuracy(np.array([[2, 8]]))[0] < 1.0  # keeping 2 of 6 first-conv channels drops read ones


def test_weight_importance_against_numpy_and_weight_masks_keep_the_most_important():
    module, variables, net, images = small()
    rng = np.random.default_rng(2)
    alphas = {"Conv_1": rng.uniform(0.01, 0.7, 6), "Dense_0": np.repeat(rng.uniform(0.01, 0.7, (1, 8)), 16, 0).ravel()}
    importance = weight_importance(net, variables, alphas)
    params = variables["params"]
    snr = lambda a: 1 / np.sqrt(np.exp(a ** 2) - 1)  # noqa: E731  mean / std of logNormal(0, a^2)
    expected = [np.abs(params["Conv_0"]["kernel"]),
                np.abs(params["Conv_1"]["kernel"]) * snr(alphas["Conv_1"])[None, None, :, None],
                np.abs(params["Dense_0"]["kernel"]) * snr(alphas["Dense_0"])[:, None]]
    for got, want in zip(importance, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    masks = weight_masks(net, variables, 0.25, importance)
    for layer, score in zip(net.layers, expected):
        kept = np.asarray(masks["params"][layer.name]["kernel"]) == 1
        assert kept.sum() == round(0.25 * kept.size)
        assert score[kept].min() >= score[~kept].max()


def test_infodrop_needs_calibration_images_and_an_unwrapped_network():
    module, variables, net, images = small()
    with pytest.raises(MaskError, match="calibration images"):
        channel_masks(net, variables, 0.5, "infodrop")
    _, wrapped = information_dropout(net, variables)
    other = trace(module, wrapped, (8, 8, 1))
    with pytest.raises(MaskError, match="already hold"):
        information_dropout(other, wrapped)
    with pytest.raises(MaskError, match="alpha_init < alpha_max"):
        information_dropout(net, variables, InfoDropConfig(alpha_init=0.8))
