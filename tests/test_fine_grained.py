"""Fine-grained pruning (`fg`): per-layer weight budgets, counted against the exported sparse network."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agmc_jax.agents import DDPGConfig
from agmc_jax.env import BudgetError, EnvConfig
from agmc_jax.fine_grained import FineGrainedEnvironment
from agmc_jax.graph import trace
from agmc_jax.models import create_model, init_model
from agmc_jax.search import SearchConfig, search
from tests.realistic import realistic

RNG = np.random.default_rng(0)
DATA = (RNG.normal(size=(48, 16, 16, 3)).astype(np.float32), RNG.integers(0, 10, 48).astype(np.int32))
MODULE = create_model("resnet20", 10, widths=(4, 8, 8))
VARIABLES = realistic(jax.eval_shape(lambda: init_model(MODULE, (16, 16, 3))))
NET = trace(MODULE, VARIABLES, (16, 16, 3))


def environment(target_params=0.4, **options):
    config = EnvConfig(target_macs=None, target_params=target_params, eval_batch=16, **options)
    return FineGrainedEnvironment(NET, VARIABLES, DATA[0], DATA[1], config)


ENV = environment()


def nonzero(tree):
    return sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(tree))


@settings(max_examples=20, deadline=None)
@given(actions=st.lists(st.floats(0, 1), min_size=len(NET.layers), max_size=len(NET.layers)))
def test_walled_policies_meet_the_parameter_budget_counted_in_the_sparse_network(actions):
    counts = ENV.policy_counts(ENV.action_to_ratio(np.array(actions)))
    variables, masks = ENV.pruned(counts)
    assert nonzero(variables["params"]) == ENV.cost(counts)["params"] <= 0.4 * NET.params
    kernels = [np.asarray(jax.tree.leaves(variables)[op.leaf]) for op in NET.analysis.layers]
    assert [int(np.count_nonzero(k)) for k in kernels] == counts.tolist()
    sparse_macs = sum(l.macs * np.count_nonzero(k) / k.size for l, k in zip(NET.layers, kernels))
    assert ENV.cost(counts)["macs"] == pytest.approx(sparse_macs)


def test_traced_masks_equal_the_exported_ones():
    env = environment(recalibrate_bn=False)
    counts = env.policy_counts(np.full(env.steps, 0.5))
    traced = jax.jit(env.masked_variables)(counts)
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(env.pruned(counts)[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fg_search_scores_and_exports_the_sparse_network():
    config = SearchConfig(method="fg", episodes=4, gnn_hidden=16, env=ENV.config,
                          ddpg=DDPGConfig(warmup_episodes=1, batch_size=8, replay_size=64))
    result = search(MODULE, VARIABLES, DATA, config=config, progress=False)
    assert result.params <= 0.4 * NET.params and result.policy()["unit"] == "weights"
    module, variables = result.slim()
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, VARIABLES)
    accuracy = np.mean(np.argmax(np.asarray(module.apply(variables, DATA[0], train=False)), -1) == DATA[1])
    assert result.accuracy == pytest.approx(accuracy, abs=1e-6)
    assert result.agent_state.actor_params["params"]["encoder_decoder"]


def test_least_squares_is_refused_for_single_weights():
    with pytest.raises(BudgetError, match="channel pruning only"):
        environment(criterion="lstsq")
