"""Agents: DDPG (AMC's algorithm) on tiny networks, the random agent and the replay buffer."""
import collections
import math
from statistics import NormalDist
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agmc_jax.agents import AGENTS, DDPGConfig, OptionError, RandomConfig, agent_config, ddpg, random_agent
from agmc_jax.agents.replay import add_batch, init_buffer, sample
from agmc_jax.errors import AgmcError


class Actor(nn.Module):
    """float32[4] -> action in [0, 1]."""

    @nn.compact
    def __call__(self, obs):
        return nn.sigmoid(nn.Dense(1)(nn.relu(nn.Dense(32)(obs))))[0]


class Critic(nn.Module):
    """(float32[4], action) -> Q."""

    @nn.compact
    def __call__(self, obs, action):
        h = nn.relu(nn.Dense(64)(jnp.concatenate([obs, action[None]])))
        return nn.Dense(1)(nn.relu(nn.Dense(64)(h)))[0]


def _features(obs):
    """The AGMC-style observation {'t': step, 'actions': actions so far} as one vector."""
    return jnp.concatenate([jax.nn.one_hot(obs["t"], 3), obs["actions"]])


class DictActor(nn.Module):
    """{'t': int32[], 'actions': float32[3]} -> action in [0, 1]."""

    @nn.compact
    def __call__(self, obs):
        return nn.sigmoid(nn.Dense(1)(nn.relu(nn.Dense(8)(_features(obs)))))[0]


class DictCritic(nn.Module):
    """({'t', 'actions'}, action) -> Q."""

    @nn.compact
    def __call__(self, obs, action):
        return nn.Dense(1)(nn.relu(nn.Dense(8)(jnp.concatenate([_features(obs), action[None]]))))[0]


WARMUP = 20
CONFIG = DDPGConfig(actor_lr=5e-4, critic_lr=1e-2, batch_size=32, replay_size=500, warmup_episodes=WARMUP,
                    sigma_decay=0.99)
AGENT = ddpg(Actor(), Critic(), CONFIG)
OBS = jnp.ones(4)
TRACES = collections.Counter()


def _counting_jit(name, fn):
    """jax.jit of `fn`, counting its traces in TRACES[name]."""

    def traced(*args):
        TRACES[name] += 1
        return fn(*args)

    return jax.jit(traced)


init = jax.jit(AGENT.init)
act = _counting_jit("act", AGENT.act)
act_many = jax.jit(jax.vmap(AGENT.act, in_axes=(None, None, 0, None)))
observe = _counting_jit("observe", AGENT.observe)
update = _counting_jit("update", AGENT.update)
add_jit = jax.jit(add_batch)


def _random_episodes(state, episodes, steps, seed=0):
    """Observe episodes of random obs, actions and rewards."""
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        obs = jnp.asarray(rng.normal(size=(steps, 4)), jnp.float32)
        actions = jnp.asarray(rng.uniform(size=steps), jnp.float32)
        state = observe(state, obs, actions, jnp.float32(rng.normal()))
    return state


def _bandit_episode(state, key, updates=10):
    """One 1-step episode of the bandit reward -(a - 0.7)^2, then `updates` update calls."""
    act_key, *update_keys = jax.random.split(key, updates + 1)
    action = act(state, OBS, act_key, True)
    state = observe(state, OBS[None], action[None], -(action - 0.7) ** 2)
    for update_key in update_keys:
        state, _ = update(state, update_key)
    return state, action


def _truncnorm_moments(mu, sigma):
    """Mean and standard deviation of N(mu, sigma) truncated to [0, 1]."""
    pdf, cdf = NormalDist().pdf, NormalDist().cdf
    a, b = -mu / sigma, (1 - mu) / sigma
    z = cdf(b) - cdf(a)
    shift = (pdf(a) - pdf(b)) / z
    return mu + sigma * shift, sigma * math.sqrt(1 + (a * pdf(a) - b * pdf(b)) / z - shift ** 2)


def _jitted(agent):
    """`agent` with its four functions jitted (width and updates are plain ints)."""
    return agent._replace(init=jax.jit(agent.init), act=jax.jit(agent.act), observe=jax.jit(agent.observe),
                          update=jax.jit(agent.update))


def _equal_trees(a, b):
    """Same structure and bitwise-equal leaves."""
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_act_without_exploration_is_the_actor_output():
    """Without exploration the action is the actor's output, in warm-up or after."""
    state = init(jax.random.key(0), OBS)
    expected = Actor().apply(state.actor_params, OBS)
    for episode in (0, WARMUP + 5):
        action = act(state._replace(episode=jnp.int32(episode)), OBS, jax.random.key(1), False)
        assert action.dtype == jnp.float32 and action.shape == ()
        np.testing.assert_allclose(action, expected, rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_exploration_after_warmup_is_truncated_normal_around_the_actor(sigma):
    """After warm-up, exploring draws from N(actor, sigma) truncated to [0, 1]."""
    state = init(jax.random.key(0), OBS)._replace(episode=jnp.int32(WARMUP), sigma=jnp.float32(sigma))
    mu = float(Actor().apply(state.actor_params, OBS))
    actions = np.asarray(act_many(state, OBS, jax.random.split(jax.random.key(2), 4000), True))
    mean, std = _truncnorm_moments(mu, sigma)
    assert actions.min() >= 0 and actions.max() <= 1
    assert abs(actions.mean() - mean) < 0.02 and abs(actions.std() - std) < 0.02
    if sigma == 0.1:
        assert abs(actions.std() - sigma) < 0.01


def test_exploration_during_warmup_is_uniform():
    """During warm-up, exploring draws uniformly on [0, 1] whatever sigma."""
    state = init(jax.random.key(0), OBS)._replace(episode=jnp.int32(WARMUP - 1), sigma=jnp.float32(0.01))
    actions = np.asarray(act_many(state, OBS, jax.random.split(jax.random.key(3), 4000), True))
    assert actions.min() >= 0 and actions.max() <= 1
    np.testing.assert_allclose(np.quantile(actions, [0.1, 0.3, 0.5, 0.7, 0.9]), [0.1, 0.3, 0.5, 0.7, 0.9], atol=0.03)


def test_observe_stores_transitions_and_wraps_at_capacity():
    """An episode stores T transitions (next obs, done on the last, the episode reward); the buffer wraps."""
    state = init(jax.random.key(0), OBS)
    obs = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    state = observe(state, obs, jnp.array([0.1, 0.2, 0.3]), jnp.float32(-2.0))
    data, buffer = state.buffer.data, state.buffer
    assert int(buffer.size) == 3 and int(buffer.index) == 3 and int(state.episode) == 1
    np.testing.assert_array_equal(data.obs[:3], obs)
    np.testing.assert_array_equal(data.next_obs[:3], obs[jnp.array([1, 2, 2])])
    np.testing.assert_array_equal(data.done[:3], [0, 0, 1])
    np.testing.assert_allclose(data.action[:3], [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(data.reward[:3], [-2, -2, -2])
    state = _random_episodes(state, 169, 3)
    assert int(state.buffer.size) == 500 and int(state.buffer.index) == 510 % 500
    last = jnp.full((3, 4), 7.0, jnp.float32)
    state = observe(state, last, jnp.array([0.4, 0.5, 0.6]), jnp.float32(1.0))
    assert int(state.buffer.size) == 500 and int(state.buffer.index) == 13
    np.testing.assert_allclose(state.buffer.data.action[10:13], [0.4, 0.5, 0.6])
    np.testing.assert_array_equal(state.buffer.data.obs[10:13], last)


def test_sigma_decays_only_after_warmup():
    """Sigma decays by sigma_decay per episode observed after warm-up only."""
    state = init(jax.random.key(0), OBS)
    for observed in range(1, WARMUP + 6):
        state = _random_episodes(state, 1, 1, seed=observed)
        expected = 0.5 * 0.99 ** max(0, observed - WARMUP)
        np.testing.assert_allclose(state.sigma, expected, rtol=1e-5)


def test_baseline_is_a_moving_average_of_episode_rewards():
    """The baseline is a moving average of episode rewards; stored rewards stay raw."""
    state = init(jax.random.key(0), OBS)
    for reward, baseline in [(1.0, 1.0), (3.0, 2.0), (-1.0, 0.5), (2.0, 1.25)]:
        state = observe(state, OBS[None], jnp.array([0.5]), jnp.float32(reward))
        np.testing.assert_allclose(state.baseline, baseline)
    np.testing.assert_array_equal(state.buffer.data.reward[:4], [1, 3, -1, 2])


def test_update_is_a_noop_during_warmup_or_with_too_few_transitions():
    """Update changes nothing (zero metrics) in warm-up or with fewer than batch_size transitions."""
    warming = _random_episodes(init(jax.random.key(0), OBS), WARMUP - 1, 3)
    starved = _random_episodes(init(jax.random.key(0), OBS), WARMUP, 1)
    assert int(warming.buffer.size) >= CONFIG.batch_size > int(starved.buffer.size)
    for state in (init(jax.random.key(0), OBS), warming, starved):
        new, metrics = update(state, jax.random.key(4))
        assert _equal_trees(new, state)
        assert set(metrics) == {"critic_loss", "actor_loss", "q"} and all(float(v) == 0 for v in metrics.values())


def _bandit_state(episodes):
    """A state past warm-up holding uniform-action transitions of the 1-step bandit."""
    state = init(jax.random.key(0), OBS)
    actions = jax.random.uniform(jax.random.key(5), (episodes,))
    for action in actions:
        state = observe(state, OBS[None], action[None], -(action - 0.7) ** 2)
    return state


def test_targets_move_by_tau_towards_the_online_networks():
    """After one update each target is (1 - tau) * old target + tau * new online network."""
    state = _bandit_state(40)
    new, metrics = update(state, jax.random.key(6))
    assert float(metrics["critic_loss"]) > 0
    for online, old_target, new_target in [(new.actor_params, state.target_actor_params, new.target_actor_params),
                                           (new.critic_params, state.target_critic_params, new.target_critic_params)]:
        assert not _equal_trees(new_target, old_target)
        expected = jax.tree.map(lambda o, t: (1 - CONFIG.tau) * np.asarray(t) + CONFIG.tau * np.asarray(o), online,
                                old_target)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), new_target, expected)


def test_update_reduces_the_critic_loss_on_a_fixed_buffer():
    """Updates fit the critic to the baseline-subtracted rewards of a fixed buffer."""
    state = _bandit_state(60)
    data = state.buffer.data
    n = int(state.buffer.size)

    @jax.jit
    def loss(params):
        q = jax.vmap(lambda o, a: Critic().apply(params, o, a))(data.obs[:n], data.action[:n])
        return jnp.mean((q - (data.reward[:n] - state.baseline)) ** 2)

    before = loss(state.critic_params)
    for key in jax.random.split(jax.random.key(7), 60):
        state, _ = update(state, key)
    assert float(loss(state.critic_params)) < 0.3 * float(before)


def test_bandit_action_converges_and_update_compiles_once():
    """On a 1-step bandit the greedy action converges to the optimum; act and update trace once."""
    state = init(jax.random.key(8), OBS)
    actions = []
    for key in jax.random.split(jax.random.key(9), 300):
        state, action = _bandit_episode(state, key)
        actions.append(float(action))
    assert 0 <= min(actions) and max(actions) <= 1
    assert abs(float(act(state, OBS, jax.random.key(0), False)) - 0.7) < 0.1
    assert TRACES["update"] == 1 and TRACES["observe"] <= 2 and TRACES["act"] == 1


def test_same_seed_gives_identical_states():
    """Same seed, bitwise-identical states; another seed, other states."""
    def run(seed):
        state = init(jax.random.key(seed), OBS)
        for key in jax.random.split(jax.random.key(seed), 2 * WARMUP):
            state, _ = _bandit_episode(state, key, updates=2)
        return state

    first = run(10)
    assert int(first.episode) == 2 * WARMUP and not _equal_trees(first.actor_params, first.target_actor_params)
    assert _equal_trees(first, run(10))
    assert not _equal_trees(first, run(11))


def test_pytree_observations():
    """Dict observations (the agmc state's) are stored, shifted to next_obs and trained on."""
    config = DDPGConfig(batch_size=4, replay_size=16, warmup_episodes=1)
    agent = _jitted(ddpg(DictActor(), DictCritic(), config))
    example = {"t": jnp.int32(0), "actions": jnp.zeros(3)}
    state = agent.init(jax.random.key(0), example)
    step_obs = {"t": jnp.arange(3, dtype=jnp.int32), "actions": jnp.array([[0, 0, 0], [0.3, 0, 0], [0.3, 0.6, 0]])}
    for episode, key in enumerate(jax.random.split(jax.random.key(1), 3)):
        action = agent.act(state, example, key, True)
        assert 0 <= float(action) <= 1
        state = agent.observe(state, step_obs, jnp.array([0.3, 0.6, 0.9]), jnp.float32(episode))
        new, metrics = agent.update(state, key)
        assert _equal_trees(new, state) == (episode == 0)
        state = new
    obs, next_obs = state.buffer.data.obs, state.buffer.data.next_obs
    assert obs["t"].dtype == jnp.int32
    np.testing.assert_array_equal(obs["t"][:3], [0, 1, 2])
    np.testing.assert_array_equal(next_obs["t"][:3], [1, 2, 2])
    np.testing.assert_allclose(next_obs["actions"][1], step_obs["actions"][2])
    assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["critic_loss"]) > 0


def test_random_agent_acts_uniformly_and_only_counts_episodes():
    """Uniform actions, exploring or not; observing counts the episode, updating changes nothing."""
    agent = _jitted(random_agent(RandomConfig(candidates=4)))
    assert (agent.width, agent.updates) == (4, 0)
    state = agent.init(jax.random.key(0), OBS)
    keys = jax.random.split(jax.random.key(1), 4000)
    for explore in (True, False):
        actions = np.asarray(jax.jit(jax.vmap(agent.act, in_axes=(None, None, 0, None)))(state, OBS, keys, explore))
        np.testing.assert_allclose(np.quantile(actions, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.03)
    state = agent.observe(state, OBS[None], jnp.array([0.5]), jnp.float32(1.0))
    new, metrics = agent.update(state, keys[0])
    assert int(new.episode) == 1 and _equal_trees(new, state) and metrics == {}


def test_registered_agents_set_width_and_updates():
    """DDPG plays one episode per round and updates T times after each unless told; random plays `candidates`."""
    config = agent_config(AGENTS["ddpg"], {"batch_size": "8", "replay_size": "16"}, episodes=40)
    assert (config.batch_size, config.replay_size, config.warmup_episodes) == (8, 16, 10)
    agent = AGENTS["ddpg"].build(config, SimpleNamespace(encoder=None), 7)
    assert (agent.width, agent.updates) == (1, 7)
    agent = AGENTS["ddpg"].build(config._replace(updates_per_episode=2), SimpleNamespace(encoder=None), 7)
    assert (agent.width, agent.updates) == (1, 2)
    assert (ddpg(Actor(), Critic(), CONFIG, updates=3).updates, AGENT.updates) == (3, 1)
    agent = AGENTS["random"].build(agent_config(AGENTS["random"], {"candidates": "3"}), None, 7)
    assert (agent.width, agent.updates) == (3, 0)
    with pytest.raises(OptionError, match="candidates"):
        agent_config(AGENTS["random"], {"sigma": 0.1})
    with pytest.raises(AgmcError, match="candidates"):
        random_agent(RandomConfig(candidates=0))


def test_invalid_config_is_rejected():
    """Hyperparameters that cannot run are refused when the agent is built."""
    with pytest.raises(AgmcError, match="replay_size"):
        ddpg(Actor(), Critic(), DDPGConfig(batch_size=64, replay_size=32))
    with pytest.raises(AgmcError, match="sigma"):
        ddpg(Actor(), Critic(), DDPGConfig(sigma=0.0))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 3, 6]), max_size=6))
def test_replay_buffer_keeps_the_newest_transitions_in_ring_order(sizes):
    """Whatever the batch sizes added, the buffer holds the newest `capacity` items at index mod capacity."""
    capacity = 4
    buffer = init_buffer({"i": jnp.int32(0), "x": jnp.zeros(2)}, capacity)
    total = 0
    for n in sizes:
        items = np.arange(total, total + n, dtype=np.int32)
        buffer = add_jit(buffer, {"i": items, "x": np.stack([items, -items], 1).astype(np.float32)})
        total += n
        data = jax.tree.map(np.asarray, buffer.data)
        assert int(buffer.size) == min(total, capacity) and int(buffer.index) == total % capacity
        for item in range(max(0, total - capacity), total):
            assert data["i"][item % capacity] == item
            np.testing.assert_array_equal(data["x"][item % capacity], [item, -item])


def test_replay_sample_is_uniform_over_filled_entries():
    """Sampling draws uniformly from the filled entries only."""
    buffer = add_batch(init_buffer(jnp.float32(0), 10), jnp.array([1.0, 2.0, 3.0]))
    batch = np.asarray(jax.jit(sample, static_argnums=2)(buffer, jax.random.key(0), 3000))
    values, counts = np.unique(batch, return_counts=True)
    np.testing.assert_array_equal(values, [1, 2, 3])
    np.testing.assert_allclose(counts / 3000, 1 / 3, atol=0.04)
