"""Masks, selection criteria, fine-grained masks and slimming on every zoo network.

The contract: the physically slimmed network computes what the masked one does, and its traced
MACs/parameters are exactly `net.cost(net.keep_counts(keep))`. Variables are realistic: Flax's
default LeCun-normal kernels, random biases and random BatchNorm statistics (built with numpy
from the `init_model` tree, which avoids compiling every zoo network's `init`).
"""
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agmc_jax.errors import MaskError
from agmc_jax.graph import trace
from agmc_jax.models import create_model, init_model
from agmc_jax.models.layers import ConvBN
from agmc_jax.prune import (Slimmed, apply_masks, channel_importance, channel_masks, reconstruct, slim,
                            vectors_from_masks, weight_masks)
from agmc_jax.prune.lstsq import refit_kernel, refit_layers, refit_systems
from realistic import realistic


# ----- helpers ------------------------------------------------------------------------------
# Compiling whole networks dominates these tests; XLA's cheapest CPU pipeline halves it.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fun):
    return jax.jit(fun, compiler_options=FAST)


class Setup:
    """A zoo network traced once: module, input shape, variables, network, jitted masked apply."""

    def __init__(self, name, shape):
        self.name, self.shape = name, shape
        self.module = create_model(name)
        self.variables = realistic(jax.eval_shape(lambda: init_model(self.module, shape)))
        self.net = trace(self.module, self.variables, shape)
        module, net = self.module, self.net
        self.masked_apply = jit(lambda v, m, x: module.apply(apply_masks(net, v, m), x, train=False))
        self.x = jax.random.normal(jax.random.key(1), (2, *shape))


@functools.lru_cache(maxsize=None)
def setup(name, shape):
    return Setup(name, shape)


def keep_pattern(net, seed):
    """0: one uniform ratio; 1: per-group ratios; 2: a dict of ratios and boolean vectors (some
    groups left out: kept whole); 3: one channel per group."""
    rng = np.random.default_rng(seed)
    if seed == 0:
        return float(rng.uniform(0.3, 0.9))
    if seed == 1:
        return [float(r) for r in rng.uniform(0.1, 1.0, len(net.group_sizes))]
    if seed == 3:
        return 1e-6
    keep = {}
    for g, size in enumerate(net.group_sizes):
        choice = rng.integers(3)
        if choice == 1:
            keep[g] = float(rng.uniform(0.1, 1.0))
        elif choice == 2:
            vector = rng.random(size) < rng.uniform(0.2, 0.9)
            vector[rng.integers(size)] = True
            keep[g] = vector
    return keep


@functools.lru_cache(maxsize=None)
def slimmed_case(name, shape, seed):
    """(setup, keep, masks, slimmed module, slimmed variables, slimmed output), checked once."""
    s = setup(name, shape)
    keep = keep_pattern(s.net, seed)
    return (s, keep, *slim_and_compare(s, keep))


def slim_and_compare(s, keep):
    masks = channel_masks(s.net, s.variables, keep)
    masked = np.asarray(s.masked_apply(s.variables, masks, s.x))
    module, slim_vars = slim(s.net, s.variables, jax.tree.map(np.asarray, masks))
    slimmed = np.asarray(jit(module.apply)(slim_vars, s.x))
    assert masked.shape == slimmed.shape
    scale = float(np.abs(masked).max())
    assert scale > 0
    assert float(np.abs(masked - slimmed).max()) <= 1e-4 * scale, (s.name, keep)
    return masks, module, slim_vars, slimmed


# ----- masked == slimmed, cost model == traced slimmed network, for every zoo network ---------
SMALL, LARGE = (16, 16, 3), (32, 32, 3)
# Every network, every kind of keep pattern on the small ones; one pattern each for the large
# ones (each slimmed network is a fresh compilation), chosen so every pattern meets every family.
ZOO_CASES = ([("lenet5", (16, 16, 1), seed) for seed in (0, 1, 2, 3)]
             + [("resnet20", SMALL, seed) for seed in (0, 1, 2, 3)]
             + [("resnet32", SMALL, 1), ("resnet56", SMALL, 2), ("vgg16", LARGE, 0),
                ("mobilenet_v1", LARGE, 2), ("mobilenet_v2", LARGE, 1), ("resnet18", LARGE, 0),
                ("resnet50", LARGE, 2)])


@pytest.mark.parametrize("name,shape,seed", ZOO_CASES, ids=[f"{n}-{s}" for n, _, s in ZOO_CASES])
def test_slimmed_equals_masked_and_cost_model(name, shape, seed):
    s, keep, masks, module, slim_vars, _ = slimmed_case(name, shape, seed)
    counts = s.net.keep_counts(keep)
    assert (counts >= 1).all() and (counts <= np.array(s.net.group_sizes)).all()
    if seed == 3:
        assert (counts == 1).all()
    # Boolean vectors are kept exactly as given; ratios keep round(ratio * size) channels.
    vectors = vectors_from_masks(s.net, masks)
    for g, value in (keep.items() if isinstance(keep, dict) else ()):
        if isinstance(value, np.ndarray):
            assert vectors[g].tolist() == value.tolist()
    assert [int(v.sum()) for v in vectors] == counts.tolist()
    slim_net = trace(module, slim_vars, shape)
    expected = s.net.cost(counts)
    assert (slim_net.macs, slim_net.params) == expected
    assert slim_net.params == sum(int(np.size(l)) for l in jax.tree.leaves(slim_vars["params"]))
    assert len(slim_net.layers) == len(s.net.layers)
    for layer, small in zip(s.net.layers, slim_net.layers):
        assert small.name == layer.name and small.kind == layer.kind
        want = counts[layer.out_group] if layer.out_group >= 0 else layer.out_channels
        assert small.out_channels == want
    assert np.isclose(s.net.layer_macs(counts).sum(), expected[0])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=12, max_size=12))
def test_masks_keep_exact_counts_and_cost_is_monotone(ratios):
    s = setup("resnet20", SMALL)
    counts = s.net.keep_counts(ratios)
    sizes = np.array(s.net.group_sizes)
    assert counts.tolist() == [max(1, round(r * n)) for r, n in zip(ratios, sizes)]
    vectors = vectors_from_masks(s.net, channel_masks(s.net, s.variables, ratios))
    assert [int(v.sum()) for v in vectors] == counts.tolist()
    macs, params = s.net.cost(counts)
    assert macs == int(macs) and params == int(params)
    assert macs <= s.net.macs and params <= s.net.params
    more = np.minimum(counts + 1, sizes)
    assert s.net.cost(more)[0] >= macs


# ----- BatchNorm shift: removed channels are exactly zero ---------------------------------
def test_removed_channels_are_exactly_zero_after_batchnorm():
    """BatchNorm adds a shift: a removed channel is zero only if its scale and shift are masked too."""
    s = setup("resnet20", SMALL)
    masks = channel_masks(s.net, s.variables, 0.5)
    apply = jit(lambda v, x: s.module.apply(v, x, train=False, capture_intermediates=True,
                                            mutable=["intermediates"]))
    _, state = apply(apply_masks(s.net, s.variables, masks), s.x)

    def at(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    convs = [("ConvBN_0",)] + [(f"BasicBlock_{b}", f"ConvBN_{c}") for b in range(9) for c in (0, 1)]
    convs += [("BasicBlock_3", "ConvBN_2"), ("BasicBlock_6", "ConvBN_2")]  # projection shortcuts
    for path in convs:
        bn_mask = at(masks["params"], path)["BatchNorm_0"]
        removed = np.asarray(bn_mask["bias"]) == 0
        assert removed.sum() == removed.size // 2
        assert np.all(np.asarray(bn_mask["scale"])[removed] == 0)
        assert np.all(np.asarray(at(masks["params"], path)["Conv_0"]["kernel"])[..., removed] == 0)
        # Unmasked, BatchNorm would map a zero input to shift - mean * scale / sqrt(var + eps) != 0.
        bn, stats = at(s.variables["params"], path)["BatchNorm_0"], at(s.variables["batch_stats"], path)["BatchNorm_0"]
        offset = bn["bias"] - stats["mean"] * bn["scale"] / np.sqrt(stats["var"] + 1e-5)
        assert np.all(offset[removed] != 0)
        captured = at(state["intermediates"], path)
        after_bn = np.asarray(captured["BatchNorm_0"]["__call__"][0])
        after_activation = np.asarray(captured["__call__"][0])
        assert np.all(after_bn[..., removed] == 0) and np.all(after_activation[..., removed] == 0)
        assert np.any(after_bn[..., ~removed] != 0)
    for b in range(9):  # the residual sum after ReLU: the stage's removed channels stay exactly zero
        removed = np.asarray(masks["params"][f"BasicBlock_{b}"]["ConvBN_1"]["BatchNorm_0"]["bias"]) == 0
        assert np.all(np.asarray(state["intermediates"][f"BasicBlock_{b}"]["__call__"][0])[..., removed] == 0)
    rows = np.asarray(masks["params"]["Dense_0"]["kernel"]).any(axis=1)
    assert rows.sum() == 32  # the dense layer reads only the kept channels of the last stage


# ----- selection criteria -------------------------------------------------------------------
class TwoConvs(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(4, 1, name="c0")(x, train)
        x = ConvBN(3, 1, name="c1")(x, train)
        return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


def test_l1_and_l2_choose_the_largest_norm_filters():
    module = TwoConvs()
    variables = realistic(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))))
    # Filters (columns): A=[1,1,1] (L1 3, L2 1.73), B=[.9,.9,.9] (L1 2.7, L2 1.56), C=[1.9,0,0], D=[1.8,0,0].
    kernel = np.array([[1.0, 0.9, 1.9, 1.8], [1.0, 0.9, 0, 0], [1.0, 0.9, 0, 0]], np.float32)
    variables["params"]["c0"]["Conv_0"]["kernel"] = -kernel.reshape(1, 1, 3, 4)  # signs must not matter
    net = trace(module, variables, (4, 4, 3))
    group = next(l for l in net.layers if l.name == "c0/Conv_0").out_group
    l1 = channel_importance(net, variables, "l1")[group]
    l2 = channel_importance(net, variables, "l2")[group]
    np.testing.assert_allclose(l1, [3.0, 2.7, 1.9, 1.8], rtol=1e-6)
    np.testing.assert_allclose(l2, [np.sqrt(3), np.sqrt(3 * 0.81), 1.9, 1.8], rtol=1e-6)

    def kept(criterion, ratio):
        masks = channel_masks(net, variables, {group: ratio}, criterion=criterion)
        return np.flatnonzero(np.asarray(masks["params"]["c0"]["Conv_0"]["kernel"]).any(axis=(0, 1, 2))).tolist()

    assert kept("l1", 0.5) == [0, 1] and kept("l2", 0.5) == [2, 3]
    assert kept("l1", 0.25) == [0] and kept("l2", 0.25) == [2] and kept("lstsq", 0.25) == [2]
    assert kept("l1", 0.75) == [0, 1, 2] and kept("l2", 0.75) == [0, 2, 3]



def test_reconstruct_refits_the_layer_that_reads_pruned_channels():
    """AMC's least squares, given masks: the consuming layer's outputs come closer to the dense network's."""
    module = TwoConvs()
    variables = realistic(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))))
    net = trace(module, variables, (4, 4, 3))
    group = next(l for l in net.layers if l.name == "c0/Conv_0").out_group
    masks = channel_masks(net, variables, {group: 0.5})
    images = np.random.default_rng(0).standard_normal((8, 4, 4, 3)).astype(np.float32)
    refitted = reconstruct(net, variables, masks, images, positions=16)  # every position of every image

    def consumer_output(v):
        _, state = module.apply(v, images, capture_intermediates=True, mutable=["intermediates"])
        return np.asarray(state["intermediates"]["c1"]["Conv_0"]["__call__"][0])

    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(refitted))]
    assert sum(changed) == 1 and net.paths[changed.index(True)] == ("params", "c1", "Conv_0", "kernel")
    reference = consumer_output(variables)
    magnitude_error = np.mean((consumer_output(apply_masks(net, variables, masks)) - reference) ** 2)
    refitted_error = np.mean((consumer_output(apply_masks(net, refitted, masks)) - reference) ** 2)
    assert refitted_error < 0.9 * magnitude_error

def test_refit_systems_summed_over_batches_equal_one_pass():
    """The Gram systems are sums over images: batches of 3 give what one pass over all 8 gives (every position of
    every image sampled, so the sets of rows are equal)."""
    module = TwoConvs()
    variables = realistic(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))))
    net = trace(module, variables, (4, 4, 3))
    images = np.random.default_rng(1).standard_normal((8, 4, 4, 3)).astype(np.float32)
    layers = refit_layers(net)
    whole = refit_systems(net, variables, images, layers, positions=16, batch=8)
    batched = refit_systems(net, variables, images, layers, positions=16, batch=3)
    assert len(whole) == len(layers) >= 1
    for (gram, rhs), (gram_b, rhs_b) in zip(whole, batched):
        np.testing.assert_allclose(gram_b, gram, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(rhs_b, rhs, rtol=1e-5, atol=1e-4)


def test_an_underdetermined_refit_is_named_in_a_warning():
    """A dense layer of 3 inputs refitted on 2 images: one warning names it; on 8 images, none."""
    module = TwoConvs()
    variables = realistic(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))))
    net = trace(module, variables, (4, 4, 3))
    images = np.random.default_rng(1).standard_normal((8, 4, 4, 3)).astype(np.float32)
    with pytest.warns(UserWarning, match="refit of Dense_0 fits 3 inputs on 2 samples") as caught:
        refit_systems(net, variables, images[:2], refit_layers(net))
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refit_systems(net, variables, images, refit_layers(net))


def test_refit_kernel_is_the_ridge_towards_the_original_weights():
    """Against NumPy: (G_kk + r I) W' = (G W)_k + r W_k on the kept rows, zero rows elsewhere. With fewer samples
    than inputs, an input the samples never excite keeps its original weights (a ridge towards zero would zero
    them: what overfitted LeNet-5's 400-input layer on 100 images)."""
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((3, 6))
    samples[:, 4] = 0.0  # input 4 is never excited by these samples
    kernel = rng.standard_normal((6, 2)).astype(np.float32)
    gram = samples.T @ samples
    keep = np.array([1, 1, 0, 1, 1, 1], bool)
    system = (jnp.asarray(gram, jnp.float32), jnp.asarray(gram @ kernel, jnp.float32))
    refitted = np.asarray(refit_kernel(jnp.asarray(kernel), system, jnp.asarray(keep), ridge=1e-3))
    kept = np.flatnonzero(keep)
    r = 1e-3 * np.trace(gram[np.ix_(kept, kept)]) / 6
    expected = np.zeros_like(kernel, np.float64)
    expected[kept] = np.linalg.solve(gram[np.ix_(kept, kept)] + r * np.eye(kept.size),
                                     (gram @ kernel)[kept] + r * kernel[kept])
    np.testing.assert_allclose(refitted, expected, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(refitted[4], kernel[4], rtol=1e-5)
    assert np.all(refitted[2] == 0)
    np.testing.assert_array_equal(refit_kernel(jnp.asarray(kernel), system, jnp.ones(6, bool)), kernel)


def test_importance_of_a_residual_group_sums_over_its_producers():
    s = setup("resnet20", SMALL)
    producers = ["ConvBN_0/Conv_0"] + [f"BasicBlock_{b}/ConvBN_1/Conv_0" for b in range(3)]
    group = next(l for l in s.net.layers if l.name == "ConvBN_0/Conv_0").out_group
    kernels = []
    for p in producers:
        scope = s.variables["params"]
        for key in p.split("/"):
            scope = scope[key]
        kernels.append(np.asarray(scope["kernel"], np.float64))
    l1 = sum(np.abs(k).sum(axis=(0, 1, 2)) for k in kernels)
    l2 = np.sqrt(sum((k ** 2).sum(axis=(0, 1, 2)) for k in kernels))
    np.testing.assert_allclose(channel_importance(s.net, s.variables, "l1")[group], l1, rtol=1e-6)
    np.testing.assert_allclose(channel_importance(s.net, s.variables, "l2")[group], l2, rtol=1e-6)
    keep = np.argsort(-l2, kind="stable")[:4]
    vectors = vectors_from_masks(s.net, channel_masks(s.net, s.variables, {group: 0.25}))
    assert sorted(np.flatnonzero(vectors[group]).tolist()) == sorted(keep.tolist())


# ----- fine-grained weight masks ------------------------------------------------------------
def test_weight_masks_exact_fraction_and_largest_magnitudes():
    s = setup("resnet20", SMALL)
    masks = weight_masks(s.net, s.variables, 0.25)
    leaves = dict(zip(s.net.paths, jax.tree.leaves(s.variables)))
    mask_leaves = dict(zip(s.net.paths, jax.tree.leaves(masks)))
    kernels = {l.kernel_path for l in s.net.layers}
    assert len(kernels) == 22
    for path, mask in mask_leaves.items():
        mask = np.asarray(mask)
        if path not in kernels:
            assert np.all(mask == 1), path
            continue
        w = np.abs(leaves[path])
        assert set(np.unique(mask).tolist()) == {0.0, 1.0}
        assert mask.sum() * 4 == mask.size, path  # exactly a quarter kept
        assert w[mask == 1].min() >= w[mask == 0].max(), path
    pruned = apply_masks(s.net, s.variables, masks)
    for layer in s.net.layers:
        k = np.asarray(dict(zip(s.net.paths, jax.tree.leaves(pruned)))[layer.kernel_path])
        assert (k == 0).sum() == 3 * k.size // 4


def test_weight_masks_per_layer_dict():
    s = setup("resnet20", SMALL)
    masks = weight_masks(s.net, s.variables, {"ConvBN_0/Conv_0": 0.5, "Dense_0": 0.1})
    stem = np.asarray(masks["params"]["ConvBN_0"]["Conv_0"]["kernel"])
    dense = np.asarray(masks["params"]["Dense_0"]["kernel"])
    assert stem.sum() == round(0.5 * stem.size) and dense.sum() == round(0.1 * dense.size)
    assert np.all(np.asarray(masks["params"]["BasicBlock_0"]["ConvBN_0"]["Conv_0"]["kernel"]) == 1)
    with pytest.raises(MaskError):
        weight_masks(s.net, s.variables, {"no/such/layer": 0.5})
    with pytest.raises(MaskError):
        weight_masks(s.net, s.variables, 0.0)


# ----- orbax round trip of a slimmed network ------------------------------------------------
def test_slimmed_network_saves_and_reloads_with_orbax(tmp_path):
    s, _, _, module, slim_vars, before = slimmed_case("resnet20", SMALL, 2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "slim", slim_vars)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "slim")
    assert jax.tree.structure(restored) == jax.tree.structure(slim_vars)
    assert jax.tree.map(np.shape, restored) == jax.tree.map(np.shape, slim_vars)
    # A fresh module: the slimmed widths come from the restored arrays only.
    reloaded = Slimmed(create_model("resnet20"))
    apply = jit(reloaded.apply)
    after = np.asarray(apply(restored, s.x))
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    with_target = checkpointer.restore(tmp_path / "slim", jax.tree.map(ocp.utils.to_shape_dtype_struct, slim_vars))
    np.testing.assert_array_equal(np.asarray(apply(with_target, s.x)), after)
