"""Fine-grained pruning (`fg`, the `Weights` kind): per-layer weight budgets, counted in the exported sparse network."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agmc_jax.agents import DDPGConfig
from agmc_jax.env import Budget, BudgetError, EnvConfig, Environment
from agmc_jax.graph import trace
from agmc_jax.kinds import Weights
from agmc_jax.models import create_model, init_model
from agmc_jax.search import SearchConfig, search
from tests.realistic import realistic

RNG = np.random.default_rng(0)
DATA = (RNG.normal(size=(48, 16, 16, 3)).astype(np.float32), RNG.integers(0, 10, 48).astype(np.int32))
MODULE = create_model("resnet20", 10, widths=(4, 8, 8))
VARIABLES = realistic(jax.eval_shape(lambda: init_model(MODULE, (16, 16, 3))))
NET = trace(MODULE, VARIABLES, (16, 16, 3))
STEPS = len(NET.layers)


def environment(target_params=0.4, **options):
    config = EnvConfig(target_macs=None, target_params=target_params, eval_batch=16, **options)
    return Environment(Weights(NET, config), VARIABLES, DATA[0], DATA[1], config)


def make_budget(**options):
    config = EnvConfig(**options)
    return Budget(Weights(NET, config), config)


ENV = environment()
BUDGETS = [make_budget(target_macs=None, target_params=0.4),
           make_budget(target_macs=None, target_params=0.3, round_to=8),
           make_budget(target_macs=0.5, target_params=0.5, round_to=4, lbound=0.1)]
ACTIONS = st.lists(st.floats(0, 1, width=32), min_size=STEPS, max_size=STEPS)


def nonzero(tree):
    return sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(tree))


def wanted_counts(budget, actions):
    """ratio * size per step (before flooring), ratio = lbound + action * (rbound - lbound), in float64."""
    config = budget.config
    ratios = config.lbound + np.clip(np.asarray(actions, np.float64), 0, 1) * (config.rbound - config.lbound)
    return ratios * budget.sizes


def amc_wall(budget, actions):
    """AMC's action wall in plain NumPy: each step's wanted count, capped so that the budget stays reachable
    with every later step at min_counts (bisection on float64 costs), at least min_counts."""
    kind, config, sizes, lows = budget.kind, budget.config, budget.sizes, budget.min_counts
    totals = np.asarray(kind.cost(sizes), np.float64)
    targets = np.array([np.inf if f is None else f * total
                        for f, total in zip((config.target_macs, config.target_params), totals)])

    def floor(count, size, step):
        """Rounded down to a multiple of the step's multiple, within [multiple, size]."""
        return count if step == 1 else min(size, max(step, count // step * step))

    wanted = np.floor(wanted_counts(budget, actions) + 1e-4).astype(np.int64)  # as the wall: float32 products
    counts = sizes.copy()
    for t, (size, low, step) in enumerate(zip(sizes, lows, budget.space.multiples)):
        trial = np.where(np.arange(len(sizes)) > t, lows, counts)
        fit, high = low, size
        while fit < high:
            trial[t] = (fit + high + 1) // 2
            fits = np.all(np.asarray(kind.cost(trial), np.float64) <= targets)
            fit, high = (trial[t], high) if fits else (fit, trial[t] - 1)
        counts[t] = max(min(floor(wanted[t], size, step), max(floor(fit, size, step), low)), low)
    return counts


@settings(max_examples=20, deadline=None)
@given(actions=ACTIONS)
def test_walled_policies_meet_the_parameter_budget_counted_in_the_sparse_network(actions):
    """Every walled policy keeps at most 40% of the parameters, counted as non-zeros of the exported network;
    each layer keeps exactly its count, and the MACs are those of the non-zero weights."""
    counts = ENV.policy_counts(np.array(actions))
    _, variables = ENV.export(counts)
    macs, params = ENV.cost(counts)
    assert nonzero(variables["params"]) == params <= 0.4 * NET.params
    kernels = [np.asarray(jax.tree.leaves(variables)[op.leaf]) for op in NET.analysis.layers]
    assert [int(np.count_nonzero(k)) for k in kernels] == counts.tolist()
    sparse_macs = sum(l.macs * np.count_nonzero(k) / k.size for l, k in zip(NET.layers, kernels))
    assert macs == pytest.approx(sparse_macs)


@settings(max_examples=20, deadline=None)
@given(index=st.sampled_from(range(len(BUDGETS))), actions=ACTIONS)
def test_the_wall_is_amcs(index, actions):
    """policy_counts equals AMC's wall written in NumPy, for parameter and MAC budgets and rounding."""
    budget = BUDGETS[index]
    np.testing.assert_array_equal(budget.policy_counts(np.array(actions)), amc_wall(budget, actions))


def test_walled_policies_meet_a_fractional_macs_budget_exactly():
    """The wall never exceeds a MAC budget that is not a whole number of MACs, as the host counts it."""
    walled = make_budget(target_macs=0.37, target_params=None)
    actions = np.full(STEPS, 0.5, np.float32)
    counts = walled.policy_counts(actions)
    assert walled.feasible(counts)
    np.testing.assert_array_equal(counts, amc_wall(walled, actions))


def test_traced_masks_equal_the_exported_ones():
    """The compiled masking gives the exported sparse variables, which are the variables times the 0/1 masks."""
    env = environment(recalibrate_bn=False)
    counts = env.policy_counts(np.full(env.steps, 0.5))
    traced = jax.jit(env.kind.mask)(env.data["kind"], jnp.asarray(counts))
    masks = env.kind.masks(jax.device_get(env.data["kind"]), counts)
    _, exported = env.export(counts)
    assert nonzero(masks) < nonzero(jax.tree.map(np.ones_like, masks))
    for a, b, v, m in zip(*map(jax.tree.leaves, (traced, exported, VARIABLES, masks))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), v * m)


def test_fg_search_scores_and_exports_the_sparse_network():
    """An fg search meets the budget, its reward is the accuracy of the exported sparse network (same shapes),
    and its agent reads the graph encoder."""
    config = SearchConfig(method="fg", episodes=4, gnn_hidden=16, env=ENV.config,
                          agent=DDPGConfig(warmup_episodes=1, batch_size=8, replay_size=64, updates_per_episode=2))
    result = search(MODULE, VARIABLES, DATA, config=config, progress=False)
    assert result.params <= 0.4 * NET.params and result.policy()["unit"] == "weights"
    module, variables = result.slim()
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, VARIABLES)
    accuracy = np.mean(np.argmax(np.asarray(module.apply(variables, DATA[0], train=False)), -1) == DATA[1])
    assert result.reward == result.accuracy == pytest.approx(accuracy, abs=1e-6)
    assert result.agent_state.actor_params["params"]["encoder"]["encoder_decoder"]


def test_least_squares_is_refused_for_single_weights():
    """lstsq refits channels; the weights kind refuses it."""
    with pytest.raises(BudgetError, match="channel pruning only"):
        Weights(NET, EnvConfig(target_macs=None, target_params=0.4, criterion="lstsq"))
