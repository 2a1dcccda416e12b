"""The random-search baseline: uniform keep ratios, no learning (the environment keeps them within budget)."""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from agmc_jax.agents.base import Agent
from agmc_jax.errors import AgmcError


class RandomConfig(NamedTuple):
    """Random search's one setting."""

    candidates: int = 4  # policies played from one state and scored in one compiled call


class RandomState(NamedTuple):
    """Only the number of episodes observed."""

    episode: jax.Array


def check_config(config: RandomConfig) -> None:
    """Raise on a config that cannot run."""
    if config.candidates < 1:
        raise AgmcError(f"RandomConfig: candidates must be positive, got {config.candidates}")


def random_agent(config: RandomConfig = RandomConfig()) -> Agent:
    """An agent whose every action is uniform on [0, 1], exploring or not."""
    check_config(config)

    def init(key, example_obs):
        """A zero episode counter."""
        return RandomState(jnp.zeros((), jnp.int32))

    def act(state, obs, key, explore):
        """A uniform action on [0, 1]."""
        return jax.random.uniform(key, (), jnp.float32)

    def observe(state, episode_obs, episode_actions, reward):
        """Count the episode."""
        return RandomState(state.episode + 1)

    def update(state, key):
        """Nothing to learn."""
        return state, {}

    return Agent(init, act, observe, update, width=config.candidates, updates=0)
