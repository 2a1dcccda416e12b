"""Simulated annealing with AutoCompress's experience rule, as an agent of the compiled search.

A policy is one action per step (per channel group, or per layer). An episode plays a neighbour of
the current policy: every step's action moves by a Gaussian step whose scale shrinks with the
temperature (`step * T / temperature`), then is clipped so that the experience rule holds: a step
with more weights than an earlier one keeps at most its ratio (prunes at least as much), one with
fewer keeps at least its ratio (steps of equal size are free), and no step keeps so much that the
action wall would have to cut a later step below the rule's floor: every played policy meets the
budget and the rule (up to rounding to whole channels). The annealing methods then raise each neighbour by one
shared shift of its actions, the largest within the budget (`EnvConfig.fill`, their default), as AutoCompress
rescales each perturbed policy to its target: without it the rule's clipping only ever lowers a policy.

Acceptance is Metropolis on normalised scores: a reward difference is divided by a running scale
of the differences seen (the mean |reward - current reward|, exponentially weighted), so a move
worse by one typical difference is accepted with probability exp(-1 / T): about 0.37 at T = 1,
below 1e-21 at T = 0.02. (NNI compares T in [20, 100] with accuracy differences in [0, 1] and so
accepts almost every worse move.) The temperature cools geometrically from `temperature` to
`final_temperature` over `cooling_episodes`. The `width` neighbours of a round are played from one
current policy and then tested one after another, each against the policy current at its turn.

Observations are dicts: "t" (the step), "actions" (the actions played before t), "weights" (each
step's weights) and "cap" (the largest action that keeps the rule and the budget both reachable):
`annealing_observation(env)`; the state's example observation also holds "start" (the first current
policy, `annealing_start(env)`), which `init` reads. The start is computed on the host at the budget, so
the compiled episodes read the budget only through `env` (an argument of the search's program).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.agents.base import Agent
from agmc_jax.errors import AgmcError

TINY = 1e-12  # smallest scale a reward difference is divided by


class AnnealingConfig(NamedTuple):
    """Annealing's settings; `cooling_episodes` defaults to the search length."""

    neighbours: int = 4  # neighbours played from one policy and scored in one compiled call
    temperature: float = 1.0  # start, in units of the running reward-difference scale
    final_temperature: float = 0.02
    cooling_episodes: int = 100  # episodes from `temperature` to `final_temperature`
    step: float = 0.3  # the neighbour's step (std of the action change) at the start temperature
    scale_decay: float = 0.9  # weight of the past in the running scale of reward differences


class AnnealingState(NamedTuple):
    """The current policy and its reward, the running scale, the temperature and the next uniform draw."""

    current: jax.Array  # float32[T] actions
    reward: jax.Array  # float32[]; -inf before the first episode
    scale_sum: jax.Array  # exponentially weighted sum of |reward differences|
    scale_weight: jax.Array  # the same sum of weights (bias correction)
    temperature: jax.Array
    draw: jax.Array  # uniform on [0, 1) for the next acceptance test
    episode: jax.Array  # int32[]


def check_config(config: AnnealingConfig) -> None:
    """Raise `AgmcError` on settings that cannot run."""
    if config.neighbours < 1 or config.cooling_episodes < 1:
        raise AgmcError("annealing: neighbours and cooling_episodes must be positive, got "
                        f"{config.neighbours} and {config.cooling_episodes}")
    if not 0 < config.final_temperature <= config.temperature:
        raise AgmcError(f"annealing: need 0 < final_temperature <= temperature, got {config.final_temperature} "
                        f"and {config.temperature}")
    if not config.step > 0 or not 0 <= config.scale_decay < 1:
        raise AgmcError(f"annealing: step must be positive and scale_decay in [0, 1), got {config.step} and "
                        f"{config.scale_decay}")


def filled_start(env, weights):
    """A start that obeys the experience rule on whole counts and fills the budget: the uniform policy, each step
    lowered to the keep ratio of the steps with fewer weights (rounding breaks the rule: rounded to 8, ResNet-20's
    16-channel groups keep 8 or 16 where its 32-channel ones keep 24), then raised one rounding multiple at a time,
    fewest weights first, while budget and rule both hold."""
    counts = np.asarray(env.uniform_counts()).copy()
    multiples = getattr(env.space, "multiples", None)
    if multiples is None:  # an action space of its own (bit widths): the uniform policy as it is
        return counts
    sizes, lowest = np.asarray(env.sizes), np.asarray(env.min_counts)
    for t in np.argsort(weights, kind="stable"):
        fewer = weights < weights[t]
        if fewer.any():
            most = np.min(counts[fewer] / sizes[fewer]) * sizes[t]
            counts[t] = max(lowest[t], min(counts[t], int(most + 1e-9) // multiples[t] * multiples[t]))
    raised = True
    while raised:
        raised = False
        for t in np.argsort(weights, kind="stable"):
            trial = counts.copy()
            trial[t] = min(sizes[t], counts[t] + multiples[t])
            fewer = weights < weights[t]
            ruled = not fewer.any() or trial[t] / sizes[t] <= np.min(counts[fewer] / sizes[fewer])
            if trial[t] > counts[t] and ruled and env.feasible(trial):
                counts, raised = trial, True
    return counts


def annealing_start(env):
    """The first current policy as actions: `filled_start` at the budget, every step's weights its layers'
    parameters (host)."""
    counts = filled_start(env, _step_weights(env))
    return env.count_action(jnp.arange(env.steps), jnp.asarray(counts, jnp.float32))


def _step_weights(env) -> np.ndarray:
    return np.asarray([sum(layer.params for layer in layers) for layers in env.kind.step_layers], np.float64)


def annealing_observation(env):
    """`observe(t, counts, actions)` for annealing on an environment (duck-typed: `steps`, `sizes`, `min_counts`,
    `kind.step_layers`, `space.wanted`, `feasible`; traceable when the environment's budget is).

    A step's weights are the parameters of the layers it prunes. "cap" is the largest action step t
    may take so that the budget stays reachable with every later step keeping what the rule asks of it
    (at least the keep of each step so far with more weights) and the others at their lowest: below it the
    action wall never has to cut a later step under the rule's floor.
    """
    steps = jnp.arange(env.steps)
    weights = jnp.asarray(_step_weights(env), jnp.float32)
    bigger = weights[:, None] > weights[None, :]  # [i, j]: step i has more weights than step j
    lowest = jnp.asarray(env.min_counts, jnp.int32)

    def completion(t, counts, actions, action):
        """Counts with step t at `action` and every later step at the least the rule and the budget allow it."""
        chosen = jnp.where(steps < t, actions, 0.0).at[t].set(action)
        floor = jnp.max(jnp.where((steps[:, None] <= t) & bigger, chosen[:, None], 0.0), axis=0)
        later = jnp.maximum(lowest, jax.vmap(lambda j, a: env.space.wanted(j, a, jnp.int32))(steps, floor))
        now = env.space.wanted(t, action, jnp.int32)
        return jnp.where(steps < t, counts, jnp.where(steps == t, now, later))

    def cap(t, counts, actions):
        def bisect(_, bounds):
            low, high = bounds
            middle = (low + high) / 2
            fits = env.feasible(completion(t, counts, actions, middle), jnp)
            return jnp.where(fits, middle, low), jnp.where(fits, high, middle)

        return jax.lax.fori_loop(0, 20, bisect, (jnp.float32(0.0), jnp.float32(1.0)))[0]

    def observe(t, counts, actions):
        return {"t": jnp.asarray(t, jnp.int32), "actions": jnp.where(steps < t, actions, 0.0),
                "weights": weights, "cap": cap(t, counts, actions)}

    return observe


def experience_interval(obs):
    """(low, high): the actions step t may take given the earlier steps' actions under the experience rule,
    and below the observation's "cap"."""
    t, actions, weights = obs["t"], obs["actions"], obs["weights"]
    earlier = jnp.arange(weights.shape[0]) < t
    bigger = earlier & (weights > weights[t])
    smaller = earlier & (weights < weights[t])
    low = jnp.max(jnp.where(bigger, actions, 0.0))
    high = jnp.minimum(jnp.min(jnp.where(smaller, actions, 1.0)), obs["cap"])
    return low, jnp.maximum(low, high)


def acceptance(delta, scale, temperature):
    """Probability of accepting a move that changes the reward by `delta` (Metropolis on delta / scale)."""
    return jnp.minimum(1.0, jnp.exp(delta / jnp.maximum(scale, TINY) / temperature))


def annealing(config: AnnealingConfig = AnnealingConfig()) -> Agent:
    """The annealing agent: act proposes a neighbour step by step, observe accepts or rejects, update cools."""
    check_config(config)
    cooling = float(np.exp(np.log(config.final_temperature / config.temperature) / config.cooling_episodes))

    def init(key, example_obs):
        """Start at the observation's start policy, with no reward yet and the start temperature."""
        return AnnealingState(jnp.asarray(example_obs["start"], jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0),
                              jnp.float32(0), jnp.float32(config.temperature), jax.random.uniform(key, ()),
                              jnp.zeros((), jnp.int32))

    def act(state, obs, key, explore):
        """The current action at step t, moved by a temperature-scaled Gaussian step when exploring, within the
        experience rule's interval."""
        t = obs["t"]
        size = config.step * state.temperature / config.temperature
        moved = state.current[t] + jnp.where(explore, size * jax.random.normal(key, ()), 0.0)
        low, high = experience_interval(obs)
        return jnp.clip(moved, low, high)

    def observe(state, episode_obs, episode_actions, reward):
        """Metropolis test of the played policy against the current one (the first one is always taken)."""
        first = jnp.isneginf(state.reward)
        delta = jnp.where(first, 0.0, reward - state.reward)
        decay = config.scale_decay
        scale_sum = jnp.where(first, state.scale_sum, decay * state.scale_sum + jnp.abs(delta))
        scale_weight = jnp.where(first, state.scale_weight, decay * state.scale_weight + 1.0)
        scale = scale_sum / jnp.maximum(scale_weight, TINY)
        accept = first | (state.draw < acceptance(delta, scale, state.temperature))
        return state._replace(current=jnp.where(accept, episode_actions, state.current),
                              reward=jnp.where(accept, reward, state.reward).astype(jnp.float32),
                              scale_sum=scale_sum, scale_weight=scale_weight, episode=state.episode + 1)

    def update(state, key):
        """Cool by one episode's factor and draw the next acceptance test's uniform."""
        temperature = jnp.maximum(state.temperature * cooling, config.final_temperature)
        return state._replace(temperature=temperature.astype(jnp.float32), draw=jax.random.uniform(key, ())), {}

    return Agent(init, act, observe, update, width=config.neighbours, updates=1)
