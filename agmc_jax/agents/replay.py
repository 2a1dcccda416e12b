"""A fixed-capacity ring buffer of pytree transitions, sampled uniformly over its filled entries."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class ReplayBuffer(NamedTuple):
    """Transitions stacked along a leading axis of length `capacity`, the next slot and the fill."""

    data: Any
    index: jax.Array
    size: jax.Array


def buffer_capacity(buffer: ReplayBuffer) -> int:
    """The number of transitions the buffer holds when full."""
    return jax.tree.leaves(buffer.data)[0].shape[0]


def init_buffer(example_transition, capacity: int) -> ReplayBuffer:
    """An empty buffer of `capacity` transitions shaped like `example_transition`."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype), example_transition)
    return ReplayBuffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def add_batch(buffer: ReplayBuffer, transitions) -> ReplayBuffer:
    """Write transitions (leading axis n) after the newest, overwriting the oldest once full."""
    cap = buffer_capacity(buffer)
    n = jax.tree.leaves(transitions)[0].shape[0]
    kept = min(n, cap)
    slots = (buffer.index + (n - kept) + jnp.arange(kept)) % cap
    data = jax.tree.map(lambda d, x: d.at[slots].set(jnp.asarray(x, d.dtype)[n - kept:]), buffer.data, transitions)
    return ReplayBuffer(data, (buffer.index + n) % cap, jnp.minimum(buffer.size + n, cap))


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int):
    """`batch_size` transitions drawn uniformly with replacement from the filled entries."""
    rows = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda d: d[rows], buffer.data)
