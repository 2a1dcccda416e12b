"""PPO as two-stage DRL runs it (Zhan, Lin, Cao): resource-constrained PPO with a Q critic.

`actors` parallel actors play one round of episodes from one policy (the search scores them in one
batched evaluation); once the round is observed, one update fits the critic and the actor on that
minibatch for `epochs` passes of minibatch SGD, then the buffer empties. The actor, one hidden layer
of 64 and a sigmoid, gives the mean of a Gaussian on [0, 1] (samples clipped to it, so the likelihood
is the censored one: the clipped mass sits on 0 and 1). Its std is annealed, not learned: the paper's
actor is mu(s) + N(0, sigma) noise, and a schedule tied to the search length explores early and narrows
the policy by the end whatever the critic says (a learned std is moved by the same noisy Q values).

The actor's loss is PPO-clip (clip 0.2) with the critic's Q(s, a) of the stored action in place of the
advantage, normalised over the SGD minibatch (mean 0, std 1) so the step does not depend on the
reward's scale. The critic regresses on the episode's return: discount 1 with AMC's sparse reward
makes every step's return the episode reward R minus a moving-average baseline b (as our DDPG). The
target networks (slow copies, tau per SGD step) enter through TD(lambda) targets, recomputed each epoch:

    y[T-1] = R - b
    y[t]   = (1 - lambda) * Q'(s[t+1], a'[t+1]) + lambda * y[t+1],
    a'     = clip(pi'(s) + clip(N(0, target_noise), -noise_clip, noise_clip), 0, 1)

with Q' and pi' the targets and a' TD3's target-policy smoothing; lambda = 1 is the plain observed
return (targets unused), lambda = 0 TD3's one-step target. On the toy of tests/test_ppo.py (reward of
the final mean policy, 5 seeds) lambda 0 stalls near the start (0.79 of 1), 0.8 does best (0.985 with 4
steps and 200 episodes, 0.998 with 6 steps and 300), 1 matches it with 6 steps but not with 4 (0.967,
worst seed 0.89). During `warmup_episodes` the actors play uniform actions and only the critic learns
(the PPO ratio needs the actor's own samples).
"""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.scipy.stats import norm

from agmc_jax.agents.base import Agent
from agmc_jax.agents.heads import batch_apply
from agmc_jax.errors import AgmcError


class PPOConfig(NamedTuple):
    """PPO hyperparameters: clip and the 64-unit layers are the paper's; the rest are measured choices."""

    actors: int = 8  # parallel actors: episodes per round, one minibatch per update
    clip: float = 0.2  # PPO-clip epsilon (paper)
    hidden: int = 64  # one hidden layer in the actor and the critic (paper)
    actor_lr: float = 1e-3  # the paper's value is lost in our copy: measured on the toy test
    critic_lr: float = 3e-3
    epochs: int = 10  # SGD passes over a round's transitions
    batch_size: int = 8  # transitions per SGD step
    sigma: float = 0.3  # policy std at the start
    sigma_final: float = 0.05  # policy std after anneal_episodes (geometric in between)
    anneal_episodes: int = 100  # episodes until sigma_final (counting warm-up); the search length by default
    tau: float = 0.01  # target networks' step towards the online ones, per SGD step
    td_lambda: float = 0.8  # 1: the observed return; 0: one-step target through the target networks
    target_noise: float = 0.1  # std of the target-policy smoothing noise (TD3's 0.2 on [-1, 1])
    noise_clip: float = 0.25  # its clip (TD3's 0.5 on [-1, 1])
    baseline_alpha: float = 0.5  # moving average of episode rewards subtracted from returns
    warmup_episodes: int = 0  # uniform actions, critic-only updates


class Rollout(NamedTuple):
    """One round's episodes, [actors, steps, ...], and how many are filled."""

    obs: Any
    actions: jax.Array
    rewards: jax.Array  # [actors]: the raw episode rewards
    filled: jax.Array


class PPOState(NamedTuple):
    """Networks, targets, optimizer states, the round being collected, the std and the baseline."""

    actor_params: Any
    critic_params: Any
    target_actor_params: Any
    target_critic_params: Any
    actor_opt_state: Any
    critic_opt_state: Any
    rollout: Rollout
    sigma: jax.Array  # the std the current round acts with
    baseline: jax.Array
    episode: jax.Array


METRICS = ("critic_loss", "actor_loss", "q", "ratio")


def log_prob(mean, sigma, action):
    """Log-likelihood of `action` under N(mean, sigma) clipped to [0, 1]: the tails' mass at 0 and 1."""
    inside = norm.logpdf(action, mean, sigma)
    return jnp.where(action <= 0.0, norm.logcdf(-mean / sigma),
                     jnp.where(action >= 1.0, norm.logcdf((mean - 1.0) / sigma), inside))


def clipped_objective(log_ratio, advantage, clip):
    """PPO-clip's surrogate, mean of min(r A, clip(r, 1 - clip, 1 + clip) A) with r = exp(log_ratio)."""
    ratio = jnp.exp(log_ratio)
    return jnp.mean(jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage))


def lambda_returns(final, next_values, td_lambda):
    """TD(lambda) targets of one sparse-reward episode with discount 1: `final` (R - b) at the last step,
    `next_values[t]` = Q'(s[t+1], a'[t+1]) bootstrapping the others ([T-1])."""
    def back(following, value):
        target = (1.0 - td_lambda) * value + td_lambda * following
        return target, target

    earlier = jax.lax.scan(back, final, next_values, reverse=True)[1]
    return jnp.concatenate([earlier, final[None]])


def annealed_sigma(config: PPOConfig, episode):
    """The policy std after `episode` episodes: sigma until warm-up ends, then geometric down to sigma_final
    at anneal_episodes."""
    span = max(config.anneal_episodes - config.warmup_episodes, 1)
    progress = jnp.clip((episode - config.warmup_episodes) / span, 0.0, 1.0)
    return jnp.float32(config.sigma) * (config.sigma_final / config.sigma) ** progress


def check_config(config: PPOConfig) -> None:
    """Raise on hyperparameters that cannot run."""
    problems = [
        (config.actors < 1, "actors must be positive"),
        (not 0 < config.clip < 1, "clip must be in (0, 1)"),
        (config.hidden < 1, "hidden must be positive"),
        (not (config.actor_lr > 0 and config.critic_lr > 0), "actor_lr and critic_lr must be positive"),
        (config.epochs < 1, "epochs must be positive"),
        (config.batch_size < 1, "batch_size must be positive"),
        (not 0 < config.sigma_final <= config.sigma, "need 0 < sigma_final <= sigma"),
        (config.anneal_episodes < 0, "anneal_episodes must be non-negative"),
        (not 0 <= config.tau <= 1, "tau must be in [0, 1]"),
        (not 0 <= config.td_lambda <= 1, "td_lambda must be in [0, 1]"),
        (config.target_noise < 0 or config.noise_clip < 0, "target_noise and noise_clip must be non-negative"),
        (not 0 < config.baseline_alpha <= 1, "baseline_alpha must be in (0, 1]"),
        (config.warmup_episodes < 0, "warmup_episodes must be non-negative"),
    ]
    for failed, message in problems:
        if failed:
            raise AgmcError(f"PPOConfig: {message}")


def ppo(actor: nn.Module, critic: nn.Module, config: PPOConfig = PPOConfig(), steps: int = 1) -> Agent:
    """A PPO agent for episodes of `steps` steps; `actor.apply(p, obs)` -> mean action in [0, 1],
    `critic.apply(p, obs, action)` -> Q. A search plays `actors` episodes per round and updates once after
    each observed episode: the update trains when the round is complete and is a no-op otherwise."""
    check_config(config)
    transitions = config.actors * steps
    if config.batch_size > transitions:
        raise AgmcError(f"PPOConfig: batch_size {config.batch_size} is larger than a round's {transitions} "
                        f"transitions ({config.actors} actors x {steps} steps); lower it or add actors")
    minibatches = transitions // config.batch_size
    actor_opt = optax.adam(config.actor_lr)
    critic_opt = optax.adam(config.critic_lr)

    def init(key, example_obs):
        """Fresh networks (targets equal to them), optimizer states and an empty round."""
        actor_key, critic_key = jax.random.split(key)
        zero = jnp.zeros((), jnp.float32)
        actor_params = actor.init(actor_key, example_obs)
        critic_params = critic.init(critic_key, example_obs, zero)
        rollout = Rollout(jax.tree.map(lambda x: jnp.zeros((config.actors, steps) + jnp.shape(x), jnp.asarray(x).dtype),
                                       example_obs),
                          jnp.zeros((config.actors, steps), jnp.float32), jnp.zeros(config.actors, jnp.float32),
                          jnp.zeros((), jnp.int32))
        return PPOState(actor_params, critic_params, actor_params, critic_params, actor_opt.init(actor_params),
                        critic_opt.init(critic_params), rollout, jnp.float32(config.sigma), zero,
                        jnp.zeros((), jnp.int32))

    def act(state, obs, key, explore):
        """The mean action; exploring: uniform in warm-up, else a clipped Gaussian sample around it."""
        mean = jnp.reshape(actor.apply(state.actor_params, obs), ())
        noise_key, uniform_key = jax.random.split(key)
        sample = jnp.clip(mean + state.sigma * jax.random.normal(noise_key), 0.0, 1.0)
        explored = jnp.where(state.episode < config.warmup_episodes, jax.random.uniform(uniform_key), sample)
        return jnp.where(explore, explored, mean)

    def observe(state, episode_obs, episode_actions, reward):
        """Store the episode in the round's next slot; update the baseline and the episode counter."""
        reward = jnp.asarray(reward, jnp.float32)
        slot = state.rollout.filled % config.actors
        rollout = Rollout(jax.tree.map(lambda b, x: b.at[slot].set(jnp.asarray(x, b.dtype)), state.rollout.obs,
                                       episode_obs),
                          state.rollout.actions.at[slot].set(jnp.asarray(episode_actions, jnp.float32)),
                          state.rollout.rewards.at[slot].set(reward), state.rollout.filled + 1)
        baseline = jnp.where(state.episode == 0, reward,
                             state.baseline + config.baseline_alpha * (reward - state.baseline))
        return state._replace(rollout=rollout, baseline=baseline, episode=state.episode + 1)

    def targets(state, key):
        """TD(lambda) targets of every stored step, [actors * steps], through the smoothed target policy."""
        obs = state.rollout.obs
        later = jax.tree.map(lambda x: jnp.reshape(x[:, 1:], (-1,) + x.shape[2:]), obs)
        noise = jnp.clip(config.target_noise * jax.random.normal(key, (config.actors * (steps - 1),)),
                         -config.noise_clip, config.noise_clip)
        smoothed = jnp.clip(batch_apply(actor, state.target_actor_params, later) + noise, 0.0, 1.0)
        next_q = batch_apply(critic, state.target_critic_params, later, smoothed).reshape(config.actors, steps - 1)
        finals = state.rollout.rewards - state.baseline
        return jax.vmap(lambda f, v: lambda_returns(f, v, config.td_lambda))(finals, next_q).reshape(-1)

    def critic_loss(params, obs, actions, target):
        q = batch_apply(critic, params, obs, actions)
        return jnp.mean((q - target) ** 2), q

    def actor_loss(params, obs, actions, old_log_prob, advantage, sigma):
        log_ratio = log_prob(batch_apply(actor, params, obs), sigma, actions) - old_log_prob
        return -clipped_objective(log_ratio, advantage, config.clip), jnp.mean(jnp.exp(log_ratio))

    def sgd_step(state, batch, on_policy):
        """One critic step, one actor step on the new critic's Q (masked in warm-up), soft target updates."""
        obs, actions, old_log_prob, target = batch
        (c_loss, q), grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic_params, obs, actions, target)
        updates, critic_opt_state = critic_opt.update(grads, state.critic_opt_state, state.critic_params)
        critic_params = optax.apply_updates(state.critic_params, updates)
        q_new = batch_apply(critic, critic_params, obs, actions)
        advantage = (q_new - jnp.mean(q_new)) / (jnp.std(q_new) + 1e-8)
        (a_loss, ratio), grads = jax.value_and_grad(actor_loss, has_aux=True)(
            state.actor_params, obs, actions, old_log_prob, jax.lax.stop_gradient(advantage), state.sigma)
        updates, actor_opt_state = actor_opt.update(grads, state.actor_opt_state, state.actor_params)
        stepped = optax.apply_updates(state.actor_params, updates)
        actor_params = jax.tree.map(lambda new, old: jnp.where(on_policy, new, old), stepped, state.actor_params)
        actor_opt_state = jax.tree.map(lambda new, old: jnp.where(on_policy, new, old), actor_opt_state,
                                       state.actor_opt_state)
        state = state._replace(
            actor_params=actor_params, critic_params=critic_params,
            target_actor_params=optax.incremental_update(actor_params, state.target_actor_params, config.tau),
            target_critic_params=optax.incremental_update(critic_params, state.target_critic_params, config.tau),
            actor_opt_state=actor_opt_state, critic_opt_state=critic_opt_state)
        return state, jnp.stack([c_loss, a_loss, jnp.mean(q), ratio])

    def train(state, key):
        """`epochs` passes of minibatch SGD over the complete round, then an empty round and the next std."""
        flat = jax.tree.map(lambda x: jnp.reshape(x, (transitions,) + x.shape[2:]), state.rollout.obs)
        actions = state.rollout.actions.reshape(-1)
        old_log_prob = log_prob(batch_apply(actor, state.actor_params, flat), state.sigma, actions)
        on_policy = state.episode - state.rollout.filled >= config.warmup_episodes

        def epoch(state, key):
            target_key, order_key = jax.random.split(key)
            data = (flat, actions, old_log_prob, targets(state, target_key))
            order = jax.random.permutation(order_key, transitions)[:minibatches * config.batch_size]
            batches = jax.tree.map(lambda x: x[order].reshape((minibatches, config.batch_size) + x.shape[1:]), data)
            return jax.lax.scan(lambda s, b: sgd_step(s, b, on_policy), state, batches)

        state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, config.epochs))
        state = state._replace(rollout=state.rollout._replace(filled=jnp.zeros((), jnp.int32)),
                               sigma=annealed_sigma(config, state.episode))
        return state, dict(zip(METRICS, jnp.mean(metrics.reshape(-1, len(METRICS)), axis=0)))

    def update(state, key):
        """Train on the round once all its `actors` episodes are observed; a no-op before."""
        zeros = {name: jnp.zeros((), jnp.float32) for name in METRICS}
        return jax.lax.cond(state.rollout.filled >= config.actors, train, lambda state, key: (state, zeros),
                            state, key)

    return Agent(init, act, observe, update, width=config.actors, updates=1)
