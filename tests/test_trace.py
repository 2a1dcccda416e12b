"""`agmc_jax.graph.trace`: channel groups checked against groups written out by hand.

Zoo networks are traced on abstract variables (`jax.eval_shape`); models defined here check the
ops the zoo does not use (concatenation, flatten, unknown channel ops, grouped convolutions).
Where masks are applied, the masked network must compute what the slimmed one does.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from realistic import realistic as realistic_variables
from hypothesis import given, settings
from hypothesis import strategies as st

from agmc_jax.errors import MaskError, TraceError
from agmc_jax.graph import trace
from agmc_jax.models import create_model, init_model
from agmc_jax.models.layers import ConvBN
from agmc_jax.prune import apply_masks, channel_masks, slim


# ----- helpers ------------------------------------------------------------------------------
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # quick compiles


def abstract_variables(module, input_shape):
    return jax.eval_shape(lambda: init_model(module, input_shape))


def zoo(name, input_shape=(32, 32, 3), **kwargs):
    module = create_model(name, **kwargs)
    return trace(module, abstract_variables(module, input_shape), input_shape)


def realistic(module, input_shape, seed=0):
    """Realistic numpy variables shaped like `module.init` (see tests/realistic.py)."""
    return realistic_variables(abstract_variables(module, input_shape), seed)


def masked_and_slimmed(net, variables, keep, x):
    """Outputs of the masked and of the slimmed network, and the slimmed (module, variables)."""
    masks = channel_masks(net, variables, keep)
    masked = jax.jit(lambda v, m, x: net.module.apply(apply_masks(net, v, m), x, train=False),
                     compiler_options=FAST)(variables, masks, x)
    module, slim_vars = slim(net, variables, jax.tree.map(np.asarray, masks))
    slimmed = jax.jit(module.apply, compiler_options=FAST)(slim_vars, x)
    return np.asarray(masked), np.asarray(slimmed), module, slim_vars, masks


def assert_close(masked, slimmed):
    assert masked.shape == slimmed.shape
    scale = max(float(np.abs(masked).max()), 1e-6)
    assert float(np.abs(masked - slimmed).max()) <= 1e-4 * scale


def producer_sets(net):
    return {frozenset(g.producers): g for g in net.groups}


# ----- residual networks --------------------------------------------------------------------
def resnet_cifar_expected(blocks_per_stage, widths=(16, 32, 64)):
    """{producer names: (size, consumer names)}, written from the architecture (He et al. 2016)."""
    n = blocks_per_stage
    expected = {}
    for stage, width in enumerate(widths):
        first, last = stage * n, stage * n + n - 1
        producers = {f"BasicBlock_{b}/ConvBN_1/Conv_0" for b in range(first, last + 1)}
        producers |= {"ConvBN_0/Conv_0"} if stage == 0 else {f"BasicBlock_{first}/ConvBN_2/Conv_0"}
        consumers = {f"BasicBlock_{b}/ConvBN_0/Conv_0" for b in range(first + 1, last + 1)}
        if stage == 0:
            consumers.add("BasicBlock_0/ConvBN_0/Conv_0")
        if stage < len(widths) - 1:
            consumers |= {f"BasicBlock_{last + 1}/ConvBN_0/Conv_0", f"BasicBlock_{last + 1}/ConvBN_2/Conv_0"}
        else:
            consumers.add("Dense_0")
        expected[frozenset(producers)] = (width, consumers)
        for b in range(first, last + 1):  # each block's first conv: a group of its own
            expected[frozenset({f"BasicBlock_{b}/ConvBN_0/Conv_0"})] = (width, {f"BasicBlock_{b}/ConvBN_1/Conv_0"})
    return expected


def test_resnet20_groups_by_hand():
    net = zoo("resnet20")
    s0 = frozenset({"ConvBN_0/Conv_0", "BasicBlock_0/ConvBN_1/Conv_0", "BasicBlock_1/ConvBN_1/Conv_0",
                    "BasicBlock_2/ConvBN_1/Conv_0"})
    s1 = frozenset({"BasicBlock_3/ConvBN_1/Conv_0", "BasicBlock_3/ConvBN_2/Conv_0", "BasicBlock_4/ConvBN_1/Conv_0",
                    "BasicBlock_5/ConvBN_1/Conv_0"})
    s2 = frozenset({"BasicBlock_6/ConvBN_1/Conv_0", "BasicBlock_6/ConvBN_2/Conv_0", "BasicBlock_7/ConvBN_1/Conv_0",
                    "BasicBlock_8/ConvBN_1/Conv_0"})
    singles = [frozenset({f"BasicBlock_{b}/ConvBN_0/Conv_0"}) for b in range(9)]
    groups = producer_sets(net)
    assert set(groups) == {s0, s1, s2, *singles}
    assert [groups[s].size for s in (s0, s1, s2)] == [16, 32, 64]
    assert [groups[s].size for s in singles] == [16] * 3 + [32] * 3 + [64] * 3
    assert set(groups[s0].consumers) == {"BasicBlock_0/ConvBN_0/Conv_0", "BasicBlock_1/ConvBN_0/Conv_0",
                                         "BasicBlock_2/ConvBN_0/Conv_0", "BasicBlock_3/ConvBN_0/Conv_0",
                                         "BasicBlock_3/ConvBN_2/Conv_0"}
    assert set(groups[s2].consumers) == {"BasicBlock_7/ConvBN_0/Conv_0", "BasicBlock_8/ConvBN_0/Conv_0", "Dense_0"}
    assert sorted(net.group_sizes) == sorted(g.size for g in net.groups)
    assert net.warnings == ()


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet56", 9)])
def test_resnet_cifar_groups(name, n):
    net = zoo(name)
    groups = producer_sets(net)
    expected = resnet_cifar_expected(n)
    assert set(groups) == set(expected)
    for producers, (size, consumers) in expected.items():
        assert groups[producers].size == size
        assert set(groups[producers].consumers) == consumers, sorted(producers)
    layers = {l.name: l for l in net.layers}
    assert len(layers) == len(net.layers) == 6 * n + 2 + 2  # convs, 2 projections, dense
    dense = net.layers[-1]
    assert (dense.name, dense.kind, dense.out_group) == ("Dense_0", "dense", -1)  # logits: never pruned
    assert dense.in_group == groups[frozenset({f"BasicBlock_{b}/ConvBN_1/Conv_0" for b in range(2 * n, 3 * n)}
                                              | {f"BasicBlock_{2 * n}/ConvBN_2/Conv_0"})].index
    assert layers["ConvBN_0/Conv_0"].in_group == -1  # the image's channels are not prunable


def test_total_macs_of_groups_resnet20():
    """A group's `macs` is what removing all its channels saves: hand count for BasicBlock_4's first conv."""
    net = zoo("resnet20")
    group = producer_sets(net)[frozenset({"BasicBlock_4/ConvBN_0/Conv_0"})]
    assert group.macs == 2 * 3 * 3 * 32 * 32 * 16 * 16  # its own conv and the next conv's inputs, at 16x16


# ----- MobileNets ---------------------------------------------------------------------------
def test_mobilenet_v1_depthwise_tied_to_its_producer():
    net = zoo("mobilenet_v1")
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    # ConvBN_0 is the stem; block i has depthwise ConvBN_{2i+1} and pointwise ConvBN_{2i+2}.
    expected = {frozenset({f"ConvBN_{2 * i}/Conv_0", f"ConvBN_{2 * i + 1}/Conv_0"}): (widths[i], {f"ConvBN_{2 * i + 2}/Conv_0"})
                for i in range(13)}
    expected[frozenset({"ConvBN_26/Conv_0"})] = (1024, {"Dense_0"})
    groups = producer_sets(net)
    assert set(groups) == set(expected)
    for producers, (size, consumers) in expected.items():
        assert (groups[producers].size, set(groups[producers].consumers)) == (size, consumers)
    layers = {l.name: l for l in net.layers}
    for i in range(13):
        dw, producer = layers[f"ConvBN_{2 * i + 1}/Conv_0"], layers[f"ConvBN_{2 * i}/Conv_0"]
        assert dw.kind == "depthwise" and dw.groups == dw.in_channels == dw.out_channels == widths[i]
        assert dw.in_group == dw.out_group == producer.out_group >= 0
    assert len(net.groups) == 14


def test_mobilenet_v2_inverted_residual_groups():
    net = zoo("mobilenet_v2")
    ir = "InvertedResidual_{}/ConvBN_{}/Conv_0".format
    # (channels, blocks) of the seven stages; a stage's projections are tied by the residual adds.
    stages = [(16, [0]), (24, [1, 2]), (32, [3, 4, 5]), (64, [6, 7, 8, 9]), (96, [10, 11, 12]),
              (160, [13, 14, 15]), (320, [16])]
    expected = {frozenset({"ConvBN_0/Conv_0", ir(0, 0)}): 32}  # stem + the first block's depthwise
    expected[frozenset({ir(0, 1)})] = 16
    for channels, blocks in stages[1:]:
        expected[frozenset(ir(b, 2) for b in blocks)] = channels
    in_features = [32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160]
    for b in range(1, 17):  # expansion and depthwise: one group per block, 6x its input width
        expected[frozenset({ir(b, 0), ir(b, 1)})] = 6 * in_features[b]
    expected[frozenset({"ConvBN_1/Conv_0"})] = 1280
    groups = producer_sets(net)
    assert {p: g.size for p, g in groups.items()} == expected
    assert set(groups[frozenset(ir(b, 2) for b in (3, 4, 5))].consumers) == {ir(4, 0), ir(5, 0), ir(6, 0)}
    assert set(groups[frozenset({"ConvBN_1/Conv_0"})].consumers) == {"Dense_0"}
    for layer in net.layers:
        if layer.kind == "depthwise":
            assert layer.in_group == layer.out_group >= 0


def test_mobilenet_v2_width_multiplier_groups():
    net = zoo("mobilenet_v2", width=0.5)
    assert net.groups[0].size == 16 and max(net.group_sizes) == 1280 and len(net.groups) == 25


# ----- a model defined here -----------------------------------------------------------------
class Toy(nn.Module):
    """Concatenation, residual add, depthwise block, global-pool head and flatten head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(8, 3, name="stem")(x, train)  # 16x16x8
        a = ConvBN(4, 1, name="branch_a")(x, train)
        b = ConvBN(6, 3, name="branch_b")(x, train)
        y = jnp.concatenate([a, b], axis=-1)  # 4 + 6 channels
        y = ConvBN(8, 1, activation=None, name="merge")(y, train)
        x = nn.relu(x + y)  # residual: stem and merge outputs tied
        x = ConvBN(8, 3, 2, groups=8, name="dw")(x, train)  # depthwise, 8x8
        x = ConvBN(12, 1, name="pw")(x, train)
        pooled = jnp.mean(x, axis=(1, 2))
        z = ConvBN(5, 3, 2, name="down")(x, train)  # 4x4x5
        flat = z.reshape((z.shape[0], -1))  # 80 features, channel-minor
        return nn.Dense(3, name="head")(pooled) + nn.Dense(3, name="flat_head")(flat)


TOY_SHAPE = (16, 16, 3)


def toy_cost(k):
    """(MACs, params) by hand for kept counts k = (stem/merge/dw, branch_a, branch_b, pw, down)."""
    k0, ka, kb, kp, kd = (int(c) for c in k)
    macs = (9 * 3 * k0 * 256 + k0 * ka * 256 + 9 * k0 * kb * 256 + (ka + kb) * k0 * 256 + 9 * k0 * 64
            + k0 * kp * 64 + 9 * kp * kd * 16 + kp * 3 + 16 * kd * 3)
    params = (27 * k0 + 2 * k0 + k0 * ka + 2 * ka + 9 * k0 * kb + 2 * kb + (ka + kb) * k0 + 2 * k0
              + 9 * k0 + 2 * k0 + k0 * kp + 2 * kp + 9 * kp * kd + 2 * kd + 3 * kp + 3 + 48 * kd + 3)
    return macs, params


@pytest.fixture(scope="module")
def toy():
    module = Toy()
    variables = realistic(module, TOY_SHAPE)
    net = trace(module, variables, TOY_SHAPE)
    return module, variables, net


def toy_order(net):
    """Group indices in the order (stem, branch_a, branch_b, pw, down)."""
    by_first = {g.producers[0]: g.index for g in net.groups}
    return [by_first[n] for n in ("stem/Conv_0", "branch_a/Conv_0", "branch_b/Conv_0", "pw/Conv_0", "down/Conv_0")]


def test_toy_groups(toy):
    _, _, net = toy
    groups = producer_sets(net)
    assert {p: g.size for p, g in groups.items()} == {
        frozenset({"stem/Conv_0", "merge/Conv_0", "dw/Conv_0"}): 8, frozenset({"branch_a/Conv_0"}): 4,
        frozenset({"branch_b/Conv_0"}): 6, frozenset({"pw/Conv_0"}): 12, frozenset({"down/Conv_0"}): 5}
    g0, ga, gb, gp, gd = toy_order(net)
    layers = {l.name: l for l in net.layers}
    assert layers["dw/Conv_0"].kind == "depthwise" and layers["dw/Conv_0"].in_group == g0
    assert set(net.groups[g0].consumers) == {"branch_a/Conv_0", "branch_b/Conv_0", "pw/Conv_0"}
    assert set(net.groups[gp].consumers) == {"down/Conv_0", "head"}
    assert set(net.groups[gd].consumers) == {"flat_head"}
    # The concatenation's consumer: rows 0-3 are branch_a's channels, rows 4-9 branch_b's.
    merge = layers["merge/Conv_0"]
    rows = net.axis_maps[net.paths.index(merge.kernel_path)][2]
    assert rows.group.tolist() == [ga] * 4 + [gb] * 6 and rows.unit.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    # The flatten: 4*4 positions times 5 channels, channel-minor.
    flat = layers["flat_head"]
    rows = net.axis_maps[net.paths.index(flat.kernel_path)][0]
    assert flat.in_channels == 80 and rows.group.tolist() == [gd] * 80
    assert rows.unit.tolist() == list(range(5)) * 16
    assert layers["head"].out_group == layers["flat_head"].out_group == -1
    assert net.warnings == ()


def test_toy_concat_consumer_listed_in_both_groups(toy):
    _, _, net = toy
    _, ga, gb, _, _ = toy_order(net)
    assert "merge/Conv_0" in net.groups[gb].consumers
    assert "merge/Conv_0" in net.groups[ga].consumers


def test_toy_counts_by_hand(toy):
    _, _, net = toy
    full = (8, 4, 6, 12, 5)
    assert (net.macs, net.params) == toy_cost(full) == (214_228, 1_852)
    order = toy_order(net)
    for g, size in zip(order, full):  # a group's MACs: what removing all of it saves
        k = list(full)
        k[order.index(g)] = 0
        assert net.groups[g].macs == toy_cost(full)[0] - toy_cost(k)[0]
        assert net.group_sizes[g] == size


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 8), st.integers(1, 4), st.integers(1, 6), st.integers(1, 12), st.integers(1, 5)))
def test_toy_cost_model_by_hand(toy, counts):
    _, _, net = toy
    ordered = np.zeros(len(net.groups), np.int64)
    ordered[toy_order(net)] = counts
    assert net.cost(ordered) == toy_cost(counts)


@pytest.mark.parametrize("keep_seed", [0, 1])
def test_toy_masked_equals_slimmed(toy, keep_seed):
    module, variables, net = toy
    rng = np.random.default_rng(keep_seed)
    keep = {g: rng.uniform(0.2, 1.0) for g in range(len(net.groups))}
    vector = np.zeros(6, bool)
    vector[rng.choice(6, 3, replace=False)] = True
    keep[toy_order(net)[2]] = vector  # branch_b: an explicit keep vector
    x = jax.random.normal(jax.random.key(keep_seed), (2, *TOY_SHAPE))
    masked, slimmed, slim_module, slim_vars, masks = masked_and_slimmed(net, variables, keep, x)
    assert_close(masked, slimmed)
    counts = net.keep_counts(keep)
    slim_net = trace(slim_module, slim_vars, TOY_SHAPE)
    assert (slim_net.macs, slim_net.params) == net.cost(counts) == toy_cost(counts[toy_order(net)])
    kept_b = np.asarray(masks["params"]["branch_b"]["Conv_0"]["kernel"]).any(axis=(0, 1, 2))
    assert kept_b.tolist() == vector.tolist()
    assert slim_vars["params"]["merge"]["Conv_0"]["kernel"].shape[2] == counts[toy_order(net)[1]] + 3


def test_depthwise_with_channel_multiplier():
    class Multiplier(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = ConvBN(6, 3, name="c0")(x, train)
            x = ConvBN(12, 3, groups=6, name="dw")(x, train)  # two outputs per input channel
            return nn.Dense(3)(jnp.mean(ConvBN(4, 1, name="c1")(x, train), axis=(1, 2)))

    module = Multiplier()
    variables = realistic(module, (8, 8, 3))
    net = trace(module, variables, (8, 8, 3))
    dw = next(l for l in net.layers if l.name == "dw/Conv_0")
    assert dw.kind == "depthwise" and dw.in_group == dw.out_group == net.layers[0].out_group
    assert net.group_sizes[dw.out_group] == 6
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    keep = {dw.out_group: np.array([True, False, True, False, False, True])}
    masked, slimmed, slim_module, slim_vars, _ = masked_and_slimmed(net, variables, keep, x)
    assert_close(masked, slimmed)
    assert slim_vars["params"]["dw"]["Conv_0"]["kernel"].shape == (3, 3, 1, 6)
    assert trace(slim_module, slim_vars, (8, 8, 3)).macs == net.cost(net.keep_counts(keep))[0]


# ----- ops the tracer cannot follow ---------------------------------------------------------
class Unfollowable(nn.Module):
    """c0 -> an op that mixes or reorders channels -> c1 -> c2 -> pooled dense head."""

    kind: str

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(8, 3, name="c0")(x, train)
        if self.kind == "cumsum":
            x = jnp.cumsum(x, axis=-1)
        elif self.kind == "shuffle":  # ShuffleNet's channel shuffle with 2 groups
            n, h, w, c = x.shape
            x = x.reshape(n, h, w, 2, c // 2).transpose(0, 1, 2, 4, 3).reshape(n, h, w, c)
        elif self.kind == "layernorm":
            x = nn.LayerNorm(name="ln")(x)
        elif self.kind == "flip":
            x = x[..., ::-1]
        elif self.kind == "gather":
            x = x[..., jnp.array([1, 0, 3, 2, 5, 4, 7, 6])]
        elif self.kind == "channel_softmax":
            x = x * jax.nn.softmax(x, axis=-1)
        elif self.kind == "grouped":
            x = ConvBN(8, 3, groups=2, name="g")(x, train)
        elif self.kind == "constant_scale":  # a fixed per-channel constant (not a parameter)
            x = x * np.linspace(0.5, 1.5, 8, dtype=np.float32)
        elif self.kind == "constant_from_shape":  # the same, sized from the input: slimming runs, silently wrong
            x = x * np.linspace(0.5, 1.5, x.shape[-1], dtype=np.float32)
        elif self.kind == "constant_mix":  # channels mixed by a constant matrix
            x = x @ jnp.asarray(np.eye(8, dtype=np.float32)[::-1] + 0.1)
        x = ConvBN(6, 3, name="c1")(x, train)
        x = ConvBN(5, 1, name="c2")(x, train)
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def check_unfollowable(kind, warning_word):
    module = Unfollowable(kind)
    variables = realistic(module, (8, 8, 3))
    with pytest.warns(UserWarning) if warning_word else _no_warning():
        net = trace(module, variables, (8, 8, 3))
    layers = {l.name: l for l in net.layers}
    assert layers["c0/Conv_0"].out_group == -1  # c0's channels take part in no group
    assert all("c0/Conv_0" not in g.producers for g in net.groups)
    if warning_word:
        assert any("c0/Conv_0" in w and warning_word in w for w in net.warnings), net.warnings
    assert layers["c1/Conv_0"].out_group >= 0 and layers["c2/Conv_0"].out_group >= 0  # the rest is prunable
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    masked, slimmed, slim_module, slim_vars, masks = masked_and_slimmed(net, variables, 0.5, x)
    assert_close(masked, slimmed)
    assert np.all(np.asarray(masks["params"]["c0"]["Conv_0"]["kernel"]) == 1)
    assert slim_vars["params"]["c0"]["Conv_0"]["kernel"].shape == (3, 3, 3, 8)
    assert slim_vars["params"]["c1"]["Conv_0"]["kernel"].shape[-1] == 3
    assert trace(slim_module, slim_vars, (8, 8, 3)).macs == net.cost(net.keep_counts(0.5))[0]
    return net


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("kind,word", [("cumsum", "cumsum"), ("shuffle", "reshape"), ("flip", "rev"),
                                       ("gather", "gather"), ("layernorm", None), ("channel_softmax", None)])
def test_unfollowable_channel_ops_are_not_pruned(kind, word):
    check_unfollowable(kind, word)


def test_grouped_convolution_frozen_and_reported():
    net = check_unfollowable("grouped", "grouped")
    g = next(l for l in net.layers if l.name == "g/Conv_0")
    assert (g.kind, g.groups, g.in_group, g.out_group) == ("grouped_conv", 2, -1, -1)
    assert (g.in_channels, g.out_channels, g.macs) == (8, 8, 9 * 4 * 8 * 64)
    assert any("g/Conv_0" in w and "grouped" in w for w in net.warnings)


@pytest.mark.parametrize("kind", ["constant_scale", "constant_from_shape", "constant_mix"])
def test_channel_constants_are_not_pruned(kind):
    check_unfollowable(kind, None)


# ----- bad input ----------------------------------------------------------------------------
class Raises(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        raise RuntimeError("user code failed\nwith a second line")


def test_module_that_raises_gives_one_line_trace_error():
    variables = {"params": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 4), np.float32), "bias": np.zeros(4, np.float32)}}}
    with pytest.raises(TraceError) as info:
        trace(Raises(), variables, (8, 8, 3))
    message = str(info.value)
    assert "\n" not in message and "Raises" in message and "user code failed" in message


def test_wrong_variables_give_trace_error():
    module = create_model("lenet5")
    variables = abstract_variables(create_model("resnet20"), (32, 32, 3))
    with pytest.raises(TraceError) as info:
        trace(module, variables, (28, 28, 1))
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def resnet20_pair():
    module = create_model("resnet20")
    variables = realistic(module, (16, 16, 3))
    other = create_model("resnet32")
    other_vars = realistic(other, (16, 16, 3))
    return (trace(module, variables, (16, 16, 3)), variables, trace(other, other_vars, (16, 16, 3)), other_vars)


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -0.25, float("nan"), [0.5] * 3, {99: 0.5}, {0: 17},
                                  {0: np.zeros(16, bool)}, {0: np.ones(5, bool)}, {0: 0.0}])
def test_bad_keep_raises_mask_error(resnet20_pair, keep):
    net, variables, _, _ = resnet20_pair
    with pytest.raises(MaskError):
        net.keep_counts(keep)
    with pytest.raises(MaskError):
        channel_masks(net, variables, keep)


def test_masks_from_another_network_raise_mask_error(resnet20_pair):
    net, variables, other_net, other_vars = resnet20_pair
    other_masks = channel_masks(other_net, other_vars, 0.5)
    with pytest.raises(MaskError):
        apply_masks(net, variables, other_masks)
    with pytest.raises(MaskError):
        slim(net, variables, other_masks)
    with pytest.raises(MaskError):
        channel_masks(net, other_vars, 0.5)
    with pytest.raises(MaskError):
        channel_masks(net, variables, 0.5, criterion="l3")
    with pytest.raises(MaskError):  # same tree, wrong shapes
        apply_masks(net, variables, jax.tree.map(lambda m: m[..., :1], channel_masks(net, variables, 0.5)))


def test_slim_with_variables_of_another_network_raises_mask_error(resnet20_pair):
    net, variables, _, other_vars = resnet20_pair
    with pytest.raises(MaskError):
        slim(net, other_vars, channel_masks(net, variables, 0.5))


@pytest.mark.parametrize("ratio", [np.array(0.5), jnp.float32(0.5)])
def test_keep_ratio_as_0d_array(resnet20_pair, ratio):
    net, _, _, _ = resnet20_pair
    assert net.keep_counts(ratio).tolist() == net.keep_counts(0.5).tolist()
