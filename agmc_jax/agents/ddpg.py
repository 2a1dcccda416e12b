"""DDPG as AMC runs it: truncated-normal exploration, random warm-up episodes, a moving-average reward baseline.

Every transition of an episode stores the episode's reward (AMC's sparse reward). The baseline, a moving
average of episode rewards, is subtracted when a batch is trained on, as AMC does: subtracting it when
storing instead would leave old transitions shifted by old baselines and bias the critic towards them.
Defaults follow AMC's search script (`amc_search.py`) and agent (`lib/agent.py`).
"""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from agmc_jax.agents.base import Agent
from agmc_jax.agents.heads import batch_apply
from agmc_jax.agents.replay import ReplayBuffer, add_batch, init_buffer, sample
from agmc_jax.errors import AgmcError


class DDPGConfig(NamedTuple):
    """DDPG hyperparameters; the defaults are AMC's."""

    actor_lr: float = 1e-4  # AMC --lr_a
    critic_lr: float = 1e-3  # AMC --lr_c
    tau: float = 0.01  # AMC --tau
    discount: float = 1.0  # AMC --discount
    batch_size: int = 64  # AMC --bsize
    replay_size: int = 2000  # transitions; AMC --rmsize 100 per prunable layer (20 layers here)
    warmup_episodes: int = 100  # AMC --warmup: random actions, no updates
    sigma: float = 0.5  # AMC --init_delta: scale of the truncated normal
    sigma_decay: float = 0.95  # AMC --delta_decay: per episode after warm-up
    baseline_alpha: float = 0.5  # AMC moving_alpha
    updates_per_episode: int | None = None  # update calls per episode (search loop); None: T, as AMC
    weight_decay: float = 0.0  # AMC uses plain Adam; >0 is decoupled (AdamW)


class Transition(NamedTuple):
    """One stored step: `reward` is the raw episode reward, `done` is 1.0 on an episode's last step."""

    obs: Any
    action: jax.Array
    reward: jax.Array
    next_obs: Any
    done: jax.Array


class DDPGState(NamedTuple):
    """Networks, targets, optimizer states, replay buffer and the exploration/baseline bookkeeping."""

    actor_params: Any
    critic_params: Any
    target_actor_params: Any
    target_critic_params: Any
    actor_opt_state: Any
    critic_opt_state: Any
    buffer: ReplayBuffer
    sigma: jax.Array
    baseline: jax.Array  # moving average of episode rewards
    episode: jax.Array  # episodes observed so far


METRICS = ("critic_loss", "actor_loss", "q")


def check_config(config: DDPGConfig) -> None:
    """Raise on hyperparameters that cannot run."""
    problems = [
        (config.batch_size < 1, "batch_size must be positive"),
        (config.replay_size < config.batch_size, "replay_size must be at least batch_size"),
        (config.warmup_episodes < 0, "warmup_episodes must be non-negative"),
        (not config.sigma > 0, "sigma must be positive"),
        (not 0 < config.sigma_decay <= 1, "sigma_decay must be in (0, 1]"),
        (not 0 <= config.tau <= 1, "tau must be in [0, 1]"),
        (not 0 < config.baseline_alpha <= 1, "baseline_alpha must be in (0, 1]"),
        (config.updates_per_episode is not None and config.updates_per_episode < 0,
         "updates_per_episode must be None or non-negative"),
    ]
    for failed, message in problems:
        if failed:
            raise AgmcError(f"DDPGConfig: {message}")


def ddpg(actor: nn.Module, critic: nn.Module, config: DDPGConfig = DDPGConfig(), updates: int = 1) -> Agent:
    """A DDPG agent; `actor.apply(p, obs)` -> action in [0, 1], `critic.apply(p, obs, action)` -> Q; a search
    runs `update` `updates` times after each observed episode."""
    check_config(config)
    actor_opt = optax.adamw(config.actor_lr, weight_decay=config.weight_decay)
    critic_opt = optax.adamw(config.critic_lr, weight_decay=config.weight_decay)

    def init(key, example_obs):
        """Fresh networks (targets equal to them), optimizer states and an empty replay buffer."""
        actor_key, critic_key = jax.random.split(key)
        zero = jnp.zeros((), jnp.float32)
        actor_params = actor.init(actor_key, example_obs)
        critic_params = critic.init(critic_key, example_obs, zero)
        buffer = init_buffer(Transition(example_obs, zero, zero, example_obs, zero), config.replay_size)
        return DDPGState(actor_params, critic_params, actor_params, critic_params, actor_opt.init(actor_params),
                         critic_opt.init(critic_params), buffer, jnp.float32(config.sigma), zero,
                         jnp.zeros((), jnp.int32))

    def act(state, obs, key, explore):
        """The actor's action mu; exploring: uniform during warm-up, then truncnorm(mu, sigma) on [0, 1]."""
        mu = jnp.clip(jnp.reshape(actor.apply(state.actor_params, obs), ()), 0.0, 1.0)
        noise_key, uniform_key = jax.random.split(key)
        sigma = jnp.maximum(state.sigma, 1e-6)
        noisy = mu + sigma * jax.random.truncated_normal(noise_key, -mu / sigma, (1.0 - mu) / sigma)
        explored = jnp.where(state.episode < config.warmup_episodes, jax.random.uniform(uniform_key),
                             jnp.clip(noisy, 0.0, 1.0))
        return jnp.where(explore, explored, mu)

    def observe(state, episode_obs, episode_actions, reward):
        """Store the episode's T transitions; update the baseline, sigma and the episode counter."""
        actions = jnp.asarray(episode_actions, jnp.float32)
        steps = actions.shape[0]
        reward = jnp.asarray(reward, jnp.float32)
        baseline = jnp.where(state.episode == 0, reward,
                             state.baseline + config.baseline_alpha * (reward - state.baseline))
        next_obs = jax.tree.map(lambda x: jnp.concatenate([x[1:], x[-1:]]), episode_obs)
        done = (jnp.arange(steps) == steps - 1).astype(jnp.float32)
        transitions = Transition(episode_obs, actions, jnp.full(steps, reward), next_obs, done)
        decay = jnp.where(state.episode >= config.warmup_episodes, config.sigma_decay, 1.0)
        return state._replace(buffer=add_batch(state.buffer, transitions), sigma=state.sigma * decay,
                              baseline=baseline, episode=state.episode + 1)

    def critic_loss(critic_params, state, batch):
        """Mean squared TD error of baseline-subtracted rewards against the target networks."""
        next_actions = batch_apply(actor, state.target_actor_params, batch.next_obs)
        next_q = batch_apply(critic, state.target_critic_params, batch.next_obs, next_actions)
        reward = batch.reward - state.baseline
        target = jax.lax.stop_gradient(reward + config.discount * (1.0 - batch.done) * next_q)
        q = batch_apply(critic, critic_params, batch.obs, batch.action)
        return jnp.mean((q - target) ** 2), q

    def actor_loss(actor_params, critic_params, obs):
        """Minus the critic's value of the actor's actions."""
        return -jnp.mean(batch_apply(critic, critic_params, obs, batch_apply(actor, actor_params, obs)))

    def step(state, key):
        """One critic step, one actor step (against the new critic), then soft target updates."""
        batch = sample(state.buffer, key, config.batch_size)
        (c_loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic_params, state, batch)
        updates, critic_opt_state = critic_opt.update(grads, state.critic_opt_state, state.critic_params)
        critic_params = optax.apply_updates(state.critic_params, updates)
        a_loss, grads = jax.value_and_grad(actor_loss)(state.actor_params, critic_params, batch.obs)
        updates, actor_opt_state = actor_opt.update(grads, state.actor_opt_state, state.actor_params)
        actor_params = optax.apply_updates(state.actor_params, updates)
        state = state._replace(
            actor_params=actor_params, critic_params=critic_params,
            target_actor_params=optax.incremental_update(actor_params, state.target_actor_params, config.tau),
            target_critic_params=optax.incremental_update(critic_params, state.target_critic_params, config.tau),
            actor_opt_state=actor_opt_state, critic_opt_state=critic_opt_state)
        return state, {"critic_loss": c_loss, "actor_loss": a_loss, "q": jnp.mean(q)}

    def update(state, key):
        """One training step on a sampled batch; a no-op in warm-up or with fewer than batch_size transitions."""
        ready = (state.episode >= config.warmup_episodes) & (state.buffer.size >= config.batch_size)
        zeros = {name: jnp.zeros((), jnp.float32) for name in METRICS}
        return jax.lax.cond(ready, step, lambda state, key: (state, zeros), state, key)

    return Agent(init, act, observe, update, width=1, updates=updates)
