"""The agents' protocol: pure functions over an explicit state pytree, like an optax transformation."""
from typing import Callable, NamedTuple


class Agent(NamedTuple):
    """An agent a compiled search drives.

    init(key, example_obs) -> state
    act(state, obs, key, explore) -> float32 action in [0, 1]
    observe(state, episode_obs, episode_actions, reward) -> state   (obs with a leading time axis)
    update(state, key) -> (state, metrics)                           (one training step)

    A search plays `width` episodes from one state (scored in one batched evaluation), then
    observes each and runs `updates` update steps after each.
    """

    init: Callable
    act: Callable
    observe: Callable
    update: Callable
    width: int = 1
    updates: int = 1
