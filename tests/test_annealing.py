"""Simulated annealing with the experience rule: a known optimum, Metropolis acceptance, the rule, determinism."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmc_jax.agents import AGENTS, AnnealingConfig, agent_config, annealing
from agmc_jax.agents.annealing import acceptance, filled_start
from agmc_jax.env import Budget, EnvConfig
from agmc_jax.graph import trace
from agmc_jax.kinds import KINDS
from agmc_jax.errors import AgmcError
from agmc_jax.models import create_model, init_model
from agmc_jax.search import build_config, get_method, search

WEIGHTS = jnp.array([10.0, 40.0, 20.0, 30.0, 5.0])
OPTIMUM = jnp.array([0.8, 0.2, 0.55, 0.4, 0.9])  # more weights, lower keep: the experience rule holds
START = jnp.full(5, 0.5)


def observation(t, actions):
    return {"t": t, "actions": jnp.where(jnp.arange(5) < t, actions, 0.0), "weights": WEIGHTS, "start": START,
            "cap": jnp.float32(1.0)}


def anneal(config, seed, episodes):
    """The search loop's shape without an environment: rounds of `neighbours` episodes played from one state,
    rewarded -||actions - OPTIMUM||^2, then observed one by one. Returns (final state, played actions)."""
    return compiled(config, episodes)(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def compiled(config, episodes):
    """The jitted search of `anneal` as a function of the seed's key (compiled once per config and length)."""
    agent = annealing(config)

    def episode(state, key):
        def step(actions, t):
            return actions.at[t].set(agent.act(state, observation(t, actions), jax.random.fold_in(key, t), True)), None
        return jax.lax.scan(step, jnp.zeros(5), jnp.arange(5))[0]

    def one_round(state, key):
        keys = jax.random.split(key, agent.width + 1)
        actions = jax.vmap(lambda k: episode(state, k))(keys[1:])
        rewards = -jnp.sum((actions - OPTIMUM) ** 2, axis=1)

        def learn(state, played):
            state = agent.observe(state, None, played[0], played[1])
            return agent.update(state, played[2])[0], None

        return jax.lax.scan(learn, state, (actions, rewards, jax.random.split(keys[0], agent.width)))[0], actions

    def run(key):
        key, init = jax.random.split(key)
        state = agent.init(init, observation(0, jnp.zeros(5)))
        return jax.lax.scan(one_round, state, jax.random.split(key, episodes // agent.width))

    return jax.jit(run)


CONFIG = AnnealingConfig(neighbours=4, cooling_episodes=600)


def test_annealing_finds_the_known_optimum():
    state, _ = anneal(CONFIG, 0, 600)
    assert float(jnp.max(jnp.abs(state.current - OPTIMUM))) < 0.05
    assert float(state.temperature) == pytest.approx(CONFIG.final_temperature, rel=1e-3)


def test_every_played_policy_obeys_the_experience_rule():
    _, played = anneal(CONFIG, 1, 200)
    played = np.asarray(played).reshape(-1, 5)
    bigger = np.asarray(WEIGHTS)[:, None] > np.asarray(WEIGHTS)[None, :]
    assert np.all((played[:, :, None] <= played[:, None, :]) | ~bigger)


def test_the_same_seed_plays_the_same_search():
    first, second, other = anneal(CONFIG, 3, 40), anneal(CONFIG, 3, 40), anneal(CONFIG, 4, 40)
    assert np.array_equal(np.asarray(first[1]), np.asarray(second[1]))
    assert not np.array_equal(np.asarray(first[1]), np.asarray(other[1]))


def test_acceptance_of_a_move_one_scale_worse_is_exp_minus_one_over_t():
    assert float(acceptance(-0.01, 0.01, 1.0)) == pytest.approx(np.exp(-1.0))
    assert float(acceptance(-0.01, 0.01, 0.02)) == pytest.approx(np.exp(-50.0))
    assert float(acceptance(0.01, 0.01, 0.02)) == 1.0


@pytest.mark.parametrize("temperature, rate", [(1.0, np.exp(-1.0)), (0.25, np.exp(-4.0)), (0.02, 0.0)])
def test_the_agent_accepts_worse_moves_at_the_documented_rate(temperature, rate):
    agent = annealing(AnnealingConfig(temperature=1.0, final_temperature=0.01))
    base = agent.init(jax.random.key(0), observation(0, jnp.zeros(5)))
    # current reward 0.5, a running scale of exactly 0.1 after the move: a move to 0.4 is one scale worse
    state = base._replace(reward=jnp.float32(0.5), scale_sum=jnp.float32(0.1), scale_weight=jnp.float32(1.0),
                          temperature=jnp.float32(temperature))
    draws = jax.random.uniform(jax.random.key(1), (20000,))
    accepted = jax.vmap(lambda d: agent.observe(state._replace(draw=d), None, OPTIMUM, jnp.float32(0.4)).reward)(draws)
    assert float(jnp.mean(accepted == jnp.float32(0.4))) == pytest.approx(rate, abs=0.01)
    better = agent.observe(state, None, OPTIMUM, jnp.float32(0.6))
    assert float(better.reward) == pytest.approx(0.6) and np.array_equal(better.current, OPTIMUM)


def test_settings_are_checked_and_cooling_follows_the_search_length():
    with pytest.raises(AgmcError, match="final_temperature <= temperature"):
        annealing(AnnealingConfig(temperature=0.01, final_temperature=0.1))
    assert agent_config(AGENTS["annealing"], {"neighbours": "2"}, episodes=30) == AnnealingConfig(
        neighbours=2, cooling_episodes=30)


def test_searched_policies_meet_the_budget_and_the_rule_up_to_one_rounding_multiple():
    """On a network, the action wall never cuts a step under the rule's floor: the agent's cap foresees it (up to
    one multiple the counts are rounded to: 8 for LeNet-5's groups of 16, 120 and 84 channels, 1 for its 6). Without
    the fill's top-up pass, which spends what the shared shift leaves wherever it fits, rule or not."""
    module = create_model("lenet5", 10)
    variables = init_model(module, (28, 28, 1))
    rng = np.random.default_rng(0)
    data = rng.normal(size=(64, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 64).astype(np.int32)
    result = search(module, variables, data, method="annealing", target_macs=0.3, episodes=8, seed=0,
                    progress=False, eval_batch=32, fill=False)
    sizes = result.env.sizes
    weights = np.array([sum(layer.params for layer in layers) for layers in result.env.kind.step_layers])
    bigger = weights[:, None] > weights[None, :]
    multiples = result.env.space.multiples
    assert multiples.tolist() == [1, 8, 8, 8]
    for record in result.history:
        keep = np.array(record["keep"])
        assert record["macs_ratio"] <= 0.3 * (1 + 1e-6)
        assert np.all(~bigger | ((keep[:, None] - keep[None, :]) * sizes[None, :]
                                 < np.maximum(multiples[:, None], multiples[None, :])))


@pytest.mark.parametrize("round_to, least", [(None, 0.35), (1, 0.49)])
def test_the_start_obeys_the_rule_on_counts_and_no_step_can_be_raised(round_to, least):
    """ResNet-20 at half the MACs: rounding breaks the rule in the uniform policy (its 32-channel residual group keeps
    more than its 16-channel one), which the agent's clipping would then collapse to the 16-channel groups' ratio; the
    start obeys the rule on whole counts, meets the budget, and no step can be raised by one multiple."""
    module = create_model("resnet20", 10)
    net = trace(module, jax.eval_shape(lambda: init_model(module, (28, 28, 1))), (28, 28, 1))
    config = EnvConfig(target_macs=0.5, round_to=round_to)
    budget = Budget(KINDS["channels"](net, config), config)
    weights = np.array([sum(layer.params for layer in layers) for layers in budget.kind.step_layers], float)
    sizes, multiples = budget.sizes, budget.space.multiples

    def ruled(counts):
        ratio = counts / sizes
        return bool(np.all((weights[:, None] <= weights[None, :]) | (ratio[:, None] <= ratio[None, :])))

    start = filled_start(budget, weights)
    assert not ruled(np.asarray(budget.uniform_counts()))
    assert budget.feasible(start) and ruled(start) and budget.ratios(start)["macs_ratio"] > least
    for t in range(len(sizes)):
        raised = start.copy()
        raised[t] = start[t] + multiples[t]
        assert start[t] == sizes[t] or not (budget.feasible(raised) and ruled(raised))


def test_shifted_is_the_largest_shared_shift_found_by_a_grid_and_every_method_fills_by_default():
    """The fill's first part raises a walled policy by one shift of every action, the largest within the budget:
    checked against a grid of 20,001 shifts on LeNet-5 policies."""
    module = create_model("lenet5", 10)
    net = trace(module, jax.eval_shape(lambda: init_model(module, (28, 28, 1))), (28, 28, 1))
    config = EnvConfig(target_macs=0.3, fill=True)
    budget = Budget(KINDS["channels"](net, config), config)
    steps, rng = np.arange(budget.steps), np.random.default_rng(0)
    wanted = jax.jit(jax.vmap(lambda actions: jax.vmap(lambda t, a: budget.space.wanted(t, a, jnp.int32))(
        jnp.arange(budget.steps), actions)))
    for _ in range(4):
        counts = budget.policy_counts(rng.uniform(size=budget.steps) * 0.5)
        actions = np.asarray(budget.count_action(steps, jnp.asarray(counts)))
        grid = np.clip(np.asarray(wanted(actions + np.linspace(0.0, 1.0, 20001)[:, None])), budget.min_counts,
                       budget.sizes)
        last = next(i for i, shifted in enumerate(grid) if not budget.feasible(shifted)) - 1
        assert np.array_equal(np.asarray(budget.shifted(jnp.asarray(counts, jnp.int32))), grid[last])
    assert get_method("annealing").env_defaults == (("fill", True),)
    assert build_config(get_method("amc"), 4, 0, 0.3, None, None, {}).env.fill
    assert not build_config(get_method("amc"), 4, 0, 0.3, None, None, {"fill": False}).env.fill
