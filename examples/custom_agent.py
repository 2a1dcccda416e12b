"""An agent (and the state it reads) added from outside agmc_jax: a hill climber over per-step actions.

An agent is a tuple of pure functions over an explicit state pytree, like an optax transformation:
`init(key, example_obs)`, `act(state, obs, key, explore)`, `observe(state, episode_obs, episode_actions, reward)`
and `update(state, key)`; the search compiles them into its episodes (`lax.scan`) and rounds (`width` episodes
scored in one batched evaluation). This one keeps the best policy seen and plays noisy copies of it; it reads only
the step index, so it comes with a state of its own (`step`).

    agmc --plugin examples.custom_agent search --workdir agmc_jax/baselines/lenet5_fashion_mnist \
        --method hill --target-macs 0.5 --episodes 40 --agent-option sigma=0.1 --out runs/hill
    python examples/custom_agent.py
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import agmc_jax
from agmc_jax.agents import Agent, AgentType
from agmc_jax.embed import State
from agmc_jax.kinds import KINDS


class HillClimbConfig(NamedTuple):
    """Its options: `--agent-option sigma=0.1` or `agent_options={"sigma": 0.1}`."""

    sigma: float = 0.2  # the exploration noise around the best actions
    candidates: int = 4  # episodes played from one state, scored in one compiled evaluation


class HillClimbState(NamedTuple):
    best_actions: jax.Array  # (steps,) the actions of the best episode so far
    best_reward: jax.Array


def hill_climb(config: HillClimbConfig, steps: int) -> Agent:
    """The agent for a search of `steps` steps per episode."""
    def init(key, example_obs):
        return HillClimbState(jnp.full(steps, 0.5, jnp.float32), jnp.asarray(-jnp.inf, jnp.float32))

    def act(state, obs, key, explore):
        noise = jnp.where(explore, config.sigma * jax.random.normal(key, ()), 0.0)
        return jnp.clip(state.best_actions[obs] + noise, 0.0, 1.0).astype(jnp.float32)

    def observe(state, episode_obs, episode_actions, reward):
        better = reward > state.best_reward
        return HillClimbState(jnp.where(better, episode_actions, state.best_actions),
                              jnp.where(better, reward, state.best_reward))

    def update(state, key):  # nothing to train: `updates=0` tells the search never to call it
        return state, {}

    return Agent(init, act, observe, update, width=config.candidates, updates=0)


def step_state(env, hidden: int = 32) -> State:
    """What the hill climber sees: the index of the step (no encoder)."""
    def observe(t, counts, actions):
        return jnp.asarray(t, jnp.int32)

    return State(observe, None, observe(0, None, None))


def check_config(config: HillClimbConfig) -> None:
    """Refuse options that cannot run when the config is built, before any network is traced."""
    if not config.sigma > 0 or config.candidates < 1:
        raise agmc_jax.AgmcError(f"hill: sigma must be positive and candidates at least 1, got {config.sigma} and "
                                 f"{config.candidates}")


HILL = AgentType("hill", HillClimbConfig, lambda config, state, steps: hill_climb(config, steps),
                 check=check_config)
agmc_jax.register_agent(HILL)
agmc_jax.register_state("step", step_state)
agmc_jax.register_method(agmc_jax.Method("hill", "hill climbing on the best policy's actions, channels (example)",
                                         KINDS["channels"], step_state, HILL), replace=True)


def main(episodes: int = 40, reward_images: int = 500):
    from agmc_jax.data import load_arrays
    from agmc_jax.networks import load_network

    module, variables, _ = load_network("agmc_jax/baselines/lenet5_fashion_mnist")
    images, labels = load_arrays("fashion_mnist", "validation", limit=reward_images)
    result = agmc_jax.search(module, variables, (images, labels), method="hill", target_macs=0.5, episodes=episodes,
                             agent_options={"sigma": 0.1}, progress=False)
    print(f"best reward {result.reward:.3f} after {len(result.history)} episodes; keeps "
          f"{np.round(result.keep, 2).tolist()}")
    return result


if __name__ == "__main__":
    main()
