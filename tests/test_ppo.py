"""PPO (two-stage DRL): the clipped objective by hand, the compiled loop on a toy with a known optimum, searches."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from agmc_jax.agents import AGENTS, Actor, Critic, OptionError, PPOConfig, agent_config, ppo
from agmc_jax.agents.ppo import annealed_sigma, clipped_objective, lambda_returns, log_prob
from agmc_jax.embed import State
from agmc_jax.env import EnvConfig
from agmc_jax.errors import AgmcError
from agmc_jax.models import create_model, init_model
from agmc_jax.search import SearchConfig, search
from agmc_jax.search.loop import Runner, make_chunk

BEST = np.array([0.3, 0.8, 0.55, 0.2], np.float32)


class Toy:
    """Four steps of 1000 units each, no wall; the reward 1 - 4 * mean((a - BEST)^2) peaks at 1 on BEST."""

    steps = len(BEST)
    sizes = np.full(len(BEST), 1000)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))

    def action_count(self, t, action, counts):
        return jnp.round(jnp.clip(action, 0.0, 1.0) * 1000).astype(counts.dtype)

    def count_action(self, t, count):
        return count / 1000.0

    def value(self, actions):
        return 1.0 - 4.0 * jnp.mean((actions - BEST) ** 2, -1)

    def scores(self, data, counts):
        return self.value(counts / 1000.0)

    def reward(self, accuracy, counts):
        return accuracy


def toy_observe(t, counts, actions):
    """The step (one-hot) and the actions so far: a Markov state for the toy."""
    return jnp.concatenate([jax.nn.one_hot(t, Toy.steps), jnp.where(jnp.arange(Toy.steps) < t, actions, 0.0)])


TOY_STATE = State(toy_observe, None, toy_observe(0, None, jnp.zeros(Toy.steps)))


def toy_agent(episodes, **options):
    config = PPOConfig(anneal_episodes=episodes)._replace(**options)
    return ppo(Actor(None, (config.hidden,)), Critic(None, (config.hidden,)), config, Toy.steps)


TOY_EPISODES = 300
TOY_AGENT = toy_agent(TOY_EPISODES)
TOY_CHUNK = make_chunk(Toy(), TOY_STATE, TOY_AGENT, rounds=TOY_EPISODES // TOY_AGENT.width + 1)


def play_toy(episodes, seed):
    """TOY_AGENT's final state and rewards after `episodes` episodes through the search's compiled chunk."""
    runner = Runner(jax.jit(TOY_AGENT.init)(jax.random.key(seed), TOY_STATE.example), jnp.zeros((), jnp.int32))
    runner, played = TOY_CHUNK(runner, jax.random.key(seed + 1), jnp.zeros(()), jnp.int32(episodes))
    return runner.agent, np.asarray(played.reward).reshape(-1)[:episodes]


def greedy_value(agent, state):
    """The toy reward of the agent's mean actions (explore=False), step by step."""
    def step(actions, t):
        action = agent.act(state, toy_observe(t, None, actions), jax.random.key(0), jnp.asarray(False))
        return actions.at[t].set(action), None

    return float(Toy().value(jax.lax.scan(step, jnp.zeros(Toy.steps), jnp.arange(Toy.steps))[0]))


def _equal_trees(a, b):
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_clipped_objective_and_its_gradient_by_hand():
    """Ratio, surrogate and d/d(new mean) of PPO-clip against the formulas, every clipping case covered."""
    sigma, clip = 0.2, 0.2
    old = np.array([0.5, 0.5, 0.5, 0.5, 0.5])
    new = np.array([0.6, 0.4, 0.4, 0.6, 0.51])
    action = np.array([0.7, 0.7, 0.3, 0.3, 0.55])
    advantage = np.array([1.0, 1.0, -2.0, -2.0, 0.5])
    # log ratio ((a - old)^2 - (a - new)^2) / (2 sigma^2): (0.04 - 0.01) / 0.08, (0.04 - 0.09) / 0.08, ...
    ratio = np.exp([0.375, -0.625, 0.375, -0.625, 0.01125])  # 1.455, 0.535, 1.455, 0.535, 1.011
    # A > 0 and r > 1.2: clipped at 1.2; A > 0, r < 0.8: r A is the min; A < 0, r > 1.2: r A; A < 0, r < 0.8: 0.8 A
    expected = np.mean([1.2 * 1.0, ratio[1] * 1.0, ratio[2] * -2.0, 0.8 * -2.0, ratio[4] * 0.5])
    unclipped = np.array([False, True, True, False, True])
    gradient = np.where(unclipped, advantage * ratio * (action - new) / sigma ** 2, 0.0) / len(action)

    def objective(means):
        log_ratio = log_prob(means, sigma, action) - log_prob(jnp.asarray(old), sigma, action)
        return clipped_objective(log_ratio, jnp.asarray(advantage), clip)

    value, grad = jax.value_and_grad(objective)(jnp.asarray(new, jnp.float32))
    np.testing.assert_allclose(value, expected, atol=2e-4)
    np.testing.assert_allclose(grad, gradient, rtol=1e-4, atol=1e-6)


def test_log_prob_is_the_censored_gaussian_and_act_samples_it():
    """Inside (0, 1) the normal density; at 0 and 1 the clipped tails' mass, which act's samples put there."""
    mean, sigma = 0.8, 0.3
    np.testing.assert_allclose(log_prob(mean, sigma, 0.5), -math.log(sigma * math.sqrt(2 * math.pi)) - 0.5, rtol=1e-6)
    np.testing.assert_allclose(log_prob(mean, sigma, 1.0), math.log(1 - _phi((1 - mean) / sigma)), rtol=1e-6)
    np.testing.assert_allclose(log_prob(mean, sigma, 0.0), math.log(_phi(-mean / sigma)), rtol=1e-5)
    agent = TOY_AGENT
    state = jax.jit(agent.init)(jax.random.key(0), TOY_STATE.example)
    assert state.sigma == np.float32(sigma)
    mu = float(agent.act(state, TOY_STATE.example, jax.random.key(1), False))
    keys = jax.random.split(jax.random.key(2), 20000)
    samples = np.asarray(jax.jit(jax.vmap(agent.act, in_axes=(None, None, 0, None)))(state, TOY_STATE.example, keys,
                                                                                    True))
    assert samples.min() == 0.0 and samples.max() == 1.0
    np.testing.assert_allclose(np.mean(samples == 1.0), 1 - _phi((1 - mu) / sigma), atol=0.01)
    inside = samples[(samples > 0) & (samples < 1)]
    np.testing.assert_allclose(np.median(inside), mu, atol=0.01)


def test_lambda_returns_by_hand():
    """y[T-1] = R - b; y[t] = (1 - lambda) Q'(t+1) + lambda y[t+1]; lambda 1 and 0 are the two extremes."""
    final, following = jnp.float32(1.0), jnp.array([0.2, -0.4])
    np.testing.assert_allclose(lambda_returns(final, following, 0.5), [0.5 * 0.2 + 0.5 * 0.3, 0.5 * -0.4 + 0.5, 1.0],
                               rtol=1e-6)
    np.testing.assert_allclose(lambda_returns(final, following, 1.0), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(lambda_returns(final, following, 0.0), [0.2, -0.4, 1.0])


def test_sigma_is_annealed_geometrically_after_warmup():
    config = PPOConfig(sigma=0.4, sigma_final=0.1, anneal_episodes=30, warmup_episodes=10)
    np.testing.assert_allclose([annealed_sigma(config, e) for e in (0, 10, 20, 30, 99)], [0.4, 0.4, 0.2, 0.1, 0.1],
                               rtol=1e-6)


def test_update_trains_once_a_round_is_complete_and_targets_trail_by_tau():
    """No-op until `actors` episodes are observed; then one SGD step (here) and an empty round; targets move by tau."""
    agent = toy_agent(8, actors=2, epochs=1, batch_size=8, tau=0.1)
    observe, update = jax.jit(agent.observe), jax.jit(agent.update)
    state = agent.init(jax.random.key(0), TOY_STATE.example)
    obs = jax.vmap(lambda t: toy_observe(t, None, jnp.full(Toy.steps, 0.5)))(jnp.arange(Toy.steps))
    state = observe(state, obs, jnp.full(Toy.steps, 0.5), jnp.float32(0.7))
    unchanged, metrics = update(state, jax.random.key(1))
    assert _equal_trees(unchanged, state) and all(float(v) == 0 for v in metrics.values())
    state = observe(state, obs, jnp.full(Toy.steps, 0.4), jnp.float32(0.9))
    np.testing.assert_allclose(state.baseline, 0.8)
    trained, metrics = update(state, jax.random.key(1))
    assert int(trained.rollout.filled) == 0 and float(metrics["critic_loss"]) > 0
    assert float(trained.sigma) < float(state.sigma)
    for online, old, new in [(trained.actor_params, state.target_actor_params, trained.target_actor_params),
                             (trained.critic_params, state.target_critic_params, trained.target_critic_params)]:
        assert not _equal_trees(online, old)
        expected = jax.tree.map(lambda o, t: 0.9 * np.asarray(t) + 0.1 * np.asarray(o), online, old)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), new, expected)


def test_ppo_reaches_the_toy_optimum_within_two_percent():
    """Through the search's compiled chunk: the mean policy scores at least 98% of the optimum (1.0)."""
    state, rewards = play_toy(TOY_EPISODES, seed=0)
    assert rewards[:TOY_AGENT.width].mean() < 0.9
    assert greedy_value(TOY_AGENT, state) >= 0.98


def test_same_seed_same_agent_and_another_seed_another():
    first, rewards = play_toy(24, seed=3)
    again, same_rewards = play_toy(24, seed=3)
    other, other_rewards = play_toy(24, seed=4)
    assert int(first.episode) == 24 and not _equal_trees(first.actor_params, first.target_actor_params)
    assert _equal_trees(first, again) and np.array_equal(rewards, same_rewards)
    assert not _equal_trees(first, other) and not np.array_equal(rewards, other_rewards)


MODULE = create_model("lenet5", 10)
VARIABLES = init_model(MODULE, (28, 28, 1))
RNG = np.random.default_rng(0)
DATA = (RNG.normal(size=(64, 28, 28, 1)).astype(np.float32), RNG.integers(0, 10, 64).astype(np.int32))


def test_ppo_search_meets_the_budget_and_options_reach_the_agent():
    """method="ppo": rounds of `actors` episodes, every policy within budget, the agent trained once per round."""
    result = search(MODULE, VARIABLES, DATA, method="ppo", episodes=8, agent_options={"actors": "4", "epochs": "2"},
                    progress=False, eval_batch=32)
    assert len(result.history) == 8 and int(result.agent_state.episode) == 8
    assert all(h["macs_ratio"] <= 0.5 * (1 + 1e-6) for h in result.history)
    assert result.macs <= 0.5 * result.net.macs * (1 + 1e-6)
    assert result.agent_state.rollout.obs.shape[:2] == (4, result.env.steps)
    assert float(result.agent_state.sigma) < PPOConfig().sigma  # annealed: it trained after each round


def test_agmc_ppo_trains_its_graph_encoder():
    """The GNN state: one round trains the encoders inside actor and critic (targets trail them by tau)."""
    config = SearchConfig(method="agmc-ppo", episodes=2, gnn_hidden=8, chunk=2, env=EnvConfig(eval_batch=32),
                          agent=agent_config(AGENTS["ppo"], {"actors": 2, "epochs": 1}, 2))
    state = search(MODULE, VARIABLES, DATA, config=config, progress=False).agent_state
    for online, target in ((state.actor_params, state.target_actor_params),
                           (state.critic_params, state.target_critic_params)):
        gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), online["params"]["encoder"],
                                            target["params"]["encoder"]))
        assert len(gaps) > 4 and max(gaps) > 0


def test_options_and_impossible_settings():
    config = agent_config(AGENTS["ppo"], {"actors": "4", "clip": "0.1"}, episodes=40)
    assert (config.actors, config.clip, config.anneal_episodes, config.hidden) == (4, 0.1, 40, 64)
    agent = AGENTS["ppo"].build(config, State(None, None, None), 5)
    assert (agent.width, agent.updates) == (4, 1)
    with pytest.raises(OptionError, match="actors"):
        agent_config(AGENTS["ppo"], {"sigma_decay": 0.9})
    for bad, match in [({"clip": 0.0}, "clip"), ({"sigma_final": 0.5}, "sigma_final"), ({"actors": 0}, "actors"),
                       ({"td_lambda": 1.5}, "td_lambda"), ({"batch_size": 41}, "batch_size")]:
        with pytest.raises(AgmcError, match=match):
            AGENTS["ppo"].build(config._replace(**{"actors": 8, **bad}), State(None, None, None), 5)
