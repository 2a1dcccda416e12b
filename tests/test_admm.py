"""ADMM structured pruning, purification and AutoCompress's rounds, against brute force and hand counts.

The projections are checked against enumerating every subset on small kernels; purification against
outputs before and after and against counts done by hand; AutoCompress end to end on a tiny residual
network with a depthwise convolution.
"""
import itertools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmc_jax.autocompress import AutoCompressConfig, autocompress, split_options, structure_masks
from agmc_jax.cli import main
from agmc_jax.data import load_arrays, mock_data
from agmc_jax.env import EnvConfig
from agmc_jax.errors import AdmmError, BudgetError, CheckpointError
from agmc_jax.graph import trace
from agmc_jax.kinds.columns import Columns
from agmc_jax.models import create_model, init_model
from agmc_jax.networks import load_network
from agmc_jax.portable import load_exported
from agmc_jax.prune import slim_variables
from agmc_jax.prune.admm import (AdmmConfig, FitConfig, Sparsity, Target, admm_train, array_feed,
                                 check_admm_config, masked_train)
from agmc_jax.prune.purify import purify, sparse_cost
from agmc_jax.prune.slim import Slimmed
from realistic import realistic


class Tiny(nn.Module):
    """A residual pair and a depthwise convolution sharing one channel group, then a plain convolution."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.Conv(4, (3, 3))(x)
        b = nn.Conv(4, (1, 1))(nn.relu(a))
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(a + b))
        d = nn.Conv(4, (3, 3), feature_group_count=4)(h)
        c = nn.relu(nn.Conv(3, (3, 3))(nn.relu(d)))
        return nn.Dense(5)(jnp.mean(c, axis=(1, 2)))


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # cheap compiles
SHAPE = (6, 6, 2)
TINY = Tiny()
VARIABLES = realistic(jax.eval_shape(lambda: TINY.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))))
NET = trace(TINY, VARIABLES, SHAPE)
SPARSITY = Sparsity(NET)


def kernels(seed=0):
    """Random kernels of the tiny network (no ties)."""
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=k.shape).astype(np.float32) for k in SPARSITY.kernels(VARIABLES["params"]))


def squared(a, b):
    return sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(a, b))


# ----- projections ------------------------------------------------------------------------------
def test_the_tiny_network_has_one_group_of_three_producers_and_one_of_one():
    assert NET.group_sizes == [4, 3]
    assert [len(g.producers) for g in NET.groups] == [3, 1]


@pytest.mark.parametrize("filters", [(2, 2), (1, 3), (3, 1)])
def test_filter_projection_is_the_nearest_point_found_by_enumeration(filters):
    w = kernels()
    best, nearest = np.inf, None
    for kept in itertools.product(*(itertools.combinations(range(s), k) for s, k in zip(NET.group_sizes, filters))):
        z = []
        for kernel, axis, leaf in zip(w, SPARSITY.out_axes, SPARSITY.leaves):
            m = NET.axis_maps[leaf][axis]
            keep = np.array([g < 0 or u in kept[g] for g, u in zip(m.group, m.unit)])
            view = [1] * kernel.ndim
            view[axis] = -1
            z.append(kernel * keep.reshape(view))
        if squared(w, z) < best:
            best, nearest = squared(w, z), z
    projected = SPARSITY.project(w, Target(filters=jnp.asarray(filters)))
    assert squared(projected, nearest) == 0.0


@pytest.mark.parametrize("layer, count", [(0, 4), (2, 2), (3, 3), (4, 1)])
def test_column_projection_is_the_nearest_point_found_by_enumeration(layer, count):
    w = kernels(1)
    kernel, axis = w[layer], SPARSITY.out_axes[layer]
    columns = np.moveaxis(kernel, axis, -1).reshape(-1, kernel.shape[axis])
    best = min(itertools.combinations(range(len(columns)), count),
               key=lambda kept: float(np.sum(np.delete(columns, list(kept), axis=0) ** 2)))
    nearest = np.zeros_like(columns)
    nearest[list(best)] = columns[list(best)]
    nearest = np.moveaxis(nearest.reshape(*np.moveaxis(kernel, axis, -1).shape), -1, axis)
    counts = SPARSITY.columns.copy()
    counts[layer] = count
    projected = SPARSITY.project(w, Target(columns=jnp.asarray(counts)))
    assert np.array_equal(np.asarray(projected[layer]), nearest)
    assert all(np.array_equal(np.asarray(p), k) for i, (p, k) in enumerate(zip(projected, w)) if i != layer)


def test_both_lies_in_both_sets_and_is_each_projection_when_the_other_keeps_everything():
    w, filters, columns = kernels(2), jnp.asarray([2, 1]), jnp.asarray(np.maximum(1, SPARSITY.columns // 3))
    both = SPARSITY.project(w, Target(filters, columns))
    assert float(SPARSITY.distance(both, Target(filters=filters))) == 0.0
    assert float(SPARSITY.distance(both, Target(columns=columns))) == 0.0
    everything = jnp.asarray(SPARSITY.columns)
    assert squared(SPARSITY.project(w, Target(filters, everything)), SPARSITY.project(w, Target(filters=filters))) == 0
    assert squared(SPARSITY.project(w, Target(jnp.asarray(NET.group_sizes), columns)),
                   SPARSITY.project(w, Target(columns=columns))) == 0


def test_hard_masks_remove_a_channel_from_every_leaf_that_carries_it():
    masks = SPARSITY.masks(VARIABLES, Target(filters=[2, 3]))
    kept, _ = sparse_cost(NET, masks)
    assert kept == NET.cost(np.array([2, 3]))[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_columns_kind_costs_exactly_what_its_masks_keep(seed):
    kind = Columns(NET, EnvConfig())
    counts = np.random.default_rng(seed).integers(1, kind.sizes + 1)
    masks = kind.masks(kind.prepare(VARIABLES, None), counts)
    assert sparse_cost(NET, masks) == tuple(float(c) for c in kind.cost(counts))
    projected = SPARSITY.masks(VARIABLES, Target(columns=counts))  # what the search scores is what ADMM targets
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(projected)))


# ----- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config, words", [(AdmmConfig(rho=0.0), "rho must be positive"),
                                           (AdmmConfig(rho_growth=-1.3), "rho_growth must be positive"),
                                           (AdmmConfig(interval=0), "interval")])
def test_bad_admm_settings_are_one_line_errors(config, words):
    with pytest.raises(AdmmError, match=words) as error:
        check_admm_config(config)
    assert "\n" not in str(error.value)


def test_counts_outside_the_network_are_refused():
    with pytest.raises(AdmmError, match="filters\\[0\\] = 5"):
        SPARSITY.check_target(Target(filters=[5, 1]))
    with pytest.raises(AdmmError, match="one count per layer"):
        SPARSITY.check_target(Target(columns=[1, 1]))


def test_an_unknown_structure_or_option_is_refused_before_anything_runs():
    with pytest.raises(AdmmError, match="unknown structure 'diagonal'; choose one of: filter, column, both"):
        split_options({"structure": "diagonal"})
    with pytest.raises(AdmmError, match="rho must be positive"):
        split_options({"rho": "0"})
    config, annealing = split_options({"rounds": "3", "temperature": "0.5"})
    assert config.rounds == 3 and annealing == {"temperature": "0.5"}


def test_a_budget_below_one_channel_per_group_is_refused_before_training():
    data = np.zeros((4, *SHAPE), np.float32), np.zeros(4, np.int32)
    feed = array_feed(*data, batch_size=4)
    with pytest.raises(BudgetError, match="one channel per group and one column per layer"):
        autocompress(TINY, VARIABLES, feed, data, target_macs=1e-4)


# ----- ADMM training ------------------------------------------------------------------------------
def teacher_data(count=256, seed=0):
    """Images and the labels a random teacher (the tiny network itself) gives them."""
    x = np.random.default_rng(seed).normal(size=(count, *SHAPE)).astype(np.float32)
    return x, np.asarray(jnp.argmax(TINY.apply(VARIABLES, x), -1)).astype(np.int32)


def test_admm_training_brings_the_kernels_near_the_set_and_masked_training_keeps_zeros():
    x, y = teacher_data()
    target = Target(filters=[2, 2], columns=np.maximum(1, SPARSITY.columns // 2))
    trained, history = admm_train(TINY, VARIABLES, array_feed(x, y, 32), SPARSITY, target,
                                  FitConfig(epochs=2, learning_rate=0.05), AdmmConfig(rho=0.5, interval=4))
    distances = [h["distance"] for h in history]
    assert distances[-1] < 0.2 * distances[0]
    assert [h["rho"] for h in history] == pytest.approx([0.5, 0.65, 0.845, 1.0, 1.0, 1.0])  # x1.3, capped at 1
    masks = SPARSITY.masks(trained, target)
    retrained, _ = masked_train(TINY, trained, masks, array_feed(x, y, 32), FitConfig(epochs=1))
    for value, mask in zip(jax.tree.leaves(retrained["params"]), jax.tree.leaves(masks["params"])):
        assert np.all(np.asarray(value)[np.asarray(mask) == 0] == 0)


# ----- purification -------------------------------------------------------------------------------
LENET = create_model("lenet5", 10)
LENET_VARIABLES = realistic(jax.eval_shape(lambda: init_model(LENET, (28, 28, 1))))
LENET_NET = trace(LENET, LENET_VARIABLES, (28, 28, 1))


def lenet_masks(edit):
    """All-ones masks of LeNet-5 with `edit(params masks)` applied (numpy, in place)."""
    masks = jax.tree.map(lambda v: np.ones(np.shape(v), np.float32), LENET_VARIABLES)
    edit(masks["params"])
    return masks


def outputs(module, variables, x):
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x))(variables, x))


@pytest.mark.parametrize("case", ["columns read nothing", "filter and bias make nothing"])
def test_purification_removes_a_useless_channel_without_changing_outputs(case):
    variables = jax.tree.map(np.array, LENET_VARIABLES)
    if case == "columns read nothing":  # masked: no column of Conv_1 reads channel 2 of Conv_0
        masks = lenet_masks(lambda params: params["Conv_1"]["kernel"].__setitem__((slice(None),) * 2 + (2,), 0))
    else:  # trained to zero: channel 2 of Conv_0 is made of nothing
        masks = lenet_masks(lambda params: None)
        variables["params"]["Conv_0"]["kernel"][..., 2] = 0
        variables["params"]["Conv_0"]["bias"][2] = 0
    result = purify(LENET_NET, variables, masks)
    assert result.removed == [1, 0, 0, 0] and not result.vectors[0][2]
    # by hand: the channel's 5x5 filter and bias (26 parameters, 25 MACs at each of 28x28 positions), and
    # Conv_1's columns on it (5x5x16 = 400 parameters, at 10x10 positions) unless the masks had them already
    filter_, columns = (25 * 28 * 28, 26), (400 * 10 * 10, 400)
    saved = filter_ if case == "columns read nothing" else tuple(a + b for a, b in zip(filter_, columns))
    assert (result.before[0] - result.after[0], result.before[1] - result.after[1]) == saved
    masked = jax.tree.map(lambda v, m: v * m, variables, masks)
    small = slim_variables(LENET_NET, jax.tree.map(lambda v, m: v * m, variables, result.masks), result.vectors)
    x = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
    assert np.allclose(outputs(LENET, masked, x), outputs(Slimmed(LENET), small, x), atol=1e-5)
    assert jax.tree.leaves(small["params"])[1].shape == (5, 5, 1, 5)


def test_purification_frees_channels_in_turn_until_nothing_changes():
    def edit(params):
        params["Dense_2"]["kernel"][:40] = 0  # the classifier reads features 40..83 of Dense_1 only
        params["Dense_1"]["kernel"][60:, 40:] = 0  # which read features 0..59 of Dense_0 only: 60..119 are
        # read by Dense_1's features 0..39 alone, useless once those go

    result = purify(LENET_NET, LENET_VARIABLES, lenet_masks(edit))
    assert result.removed == [0, 0, 60, 40]


def test_purification_of_a_column_pruned_resnet_keeps_its_outputs():
    module = create_model("resnet20", 10)
    shape = (8, 8, 3)
    variables = realistic(jax.eval_shape(lambda: init_model(module, shape)), seed=1)
    net = trace(module, variables, shape)
    sparsity = Sparsity(net)
    masks = sparsity.masks(variables, Target(columns=np.maximum(1, sparsity.columns // 12)))
    result = purify(net, variables, masks)
    assert sum(result.removed) > 0 and result.after[1] < result.before[1]
    masked = jax.tree.map(lambda v, m: v * m, variables, masks)
    small = slim_variables(net, jax.tree.map(lambda v, m: v * m, variables, result.masks), result.vectors)
    x = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32)
    call = lambda m, v: np.asarray(jax.jit(lambda v, x: m.apply(v, x, train=False),  # noqa: E731
                                           compiler_options=FAST)(v, x))
    assert np.allclose(call(module, masked), call(Slimmed(module), small), atol=1e-4)


# ----- AutoCompress end to end --------------------------------------------------------------------
def test_autocompress_meets_the_budget_with_both_structures_and_resumes_from_its_stages(tmp_path):
    x, y = teacher_data(192)
    config = AutoCompressConfig(structure="both", rounds=1, episodes=4, admm_epochs=1, retrain_epochs=1,
                                admm_interval=2, rho=0.01)
    run = lambda **resume: autocompress(TINY, VARIABLES, array_feed(x, y, 32), (x[:64], y[:64]),  # noqa: E731
                                        target_macs=0.4, config=config, eval_batch=32, calibration_images=32,
                                        out=tmp_path, **resume)
    result = run()
    assert result.macs <= 0.4 * NET.macs
    assert [s["structure"] for s in result.stages] == ["filter", "column"]
    filters = result.stages[0]
    assert filters["macs"] <= filters["budget"]["macs"] and filters["purified"]["max_output_change"] < 1e-4
    assert isinstance(result.module, Slimmed)
    final = trace(result.module, result.variables, SHAPE)
    assert sparse_cost(final, structure_masks(result.variables)) == (result.macs, result.params)
    assert np.isfinite(np.asarray(result.module.apply(result.variables, x[:4]))).all()
    with pytest.raises(CheckpointError, match="pass --resume"):
        run()
    resumed = run(resume=True)  # every stage is done: nothing runs again
    assert resumed.stages == result.stages and (resumed.macs, resumed.params) == (result.macs, result.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed.variables),
                                                    jax.tree.leaves(result.variables)))


# ----- the command line ----------------------------------------------------------------------------
BASELINE = Path(__file__).parents[1] / "agmc_jax" / "baselines" / "lenet5_fashion_mnist"


@pytest.mark.parametrize("options, words", [
    (["--agent-option", "structure=diagonal"], "unknown structure 'diagonal'"),
    (["--agent-option", "rho_growth=0"], "rho_growth must be positive"),
    (["--target-macs", "0.0001"], "one channel per group and one column per layer")])
def test_bad_autocompress_input_is_one_line_with_status_2_and_writes_nothing(capsys, tmp_path, options, words):
    out = tmp_path / "c"
    try:
        main(["compress", "--workdir", str(BASELINE), "--out", str(out), "--method", "autocompress", *options])
        status = 0
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and words in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_compress_autocompress_meets_the_budget_and_its_export_runs(capsys, tmp_path):
    """`agmc compress --method autocompress` end to end (mock data: the pipeline, not accuracy), then
    `agmc export` of its output: the portable program gives the fine-tuned network's logits."""
    out, exported = tmp_path / "c", tmp_path / "e"
    options = ["structure=filter", "rounds=1", "episodes=4", "admm_interval=1", "rho=0.01"]
    with mock_data(256):
        main(["compress", "--workdir", str(BASELINE), "--out", str(out), "--method", "autocompress",
              "--target-macs", "0.5", "--reward-images", "64", "--lr", "0.01",
              *itertools.chain.from_iterable(("--agent-option", o) for o in options)])
        images, _ = load_arrays("fashion_mnist", "validation", None, limit=16)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "autocompress" and report["macs"]["ratio"] <= 0.5
    assert [s["purified"]["max_output_change"] < 1e-4 for s in report["autocompress"]["stages"]] == [True]
    assert "physically smaller" in report["autocompress"]["export"] and report["latency_ms_batch128"]["slim"] > 0
    main(["export", str(out), "--out", str(exported)])
    module, variables, _ = load_network(out / "finetune")
    expected = np.asarray(module.apply(variables, images))
    np.testing.assert_allclose(np.asarray(load_exported(exported)(images)), expected, rtol=1e-4, atol=1e-4)
    resume = ["compress", "--workdir", str(BASELINE), "--out", str(out), "--method", "autocompress", "--resume",
              "--target-macs", "0.5", "--reward-images", "64",
              *itertools.chain.from_iterable(("--agent-option", o) for o in options)]
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # another learning rate than its fine-tune's: one line, nothing run
        main([*resume, "--lr", "0.05"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and len(err.splitlines()) == 1 and "learning_rate 0.01 -> 0.05" in err, err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    with mock_data(256):
        main([*resume, "--lr", "0.01"])  # the same: the fine-tuned network is read back, not trained again
    assert "fine-tune with every pruned weight fixed" not in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["accuracy"] == report["accuracy"]


def test_compress_help_names_every_autocompress_option(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "autocompress:" in text
    assert all(field in text for field in AutoCompressConfig._fields if field != "structure")
