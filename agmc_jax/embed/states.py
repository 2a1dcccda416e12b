"""What an agent sees at each step: AGMC's graph encoder-decoder, AMC's rule-based vector, or nothing.

A state is built from the environment (duck-typed: `steps`, `sizes`, `kind`, `cost`, `totals`) and
gives a pure `observe(t, counts, actions)` for compiled episodes plus the encoder module that turns
an observation into features (None when the observation already is the feature vector). Agents
put their heads on that encoder, so the encoder trains with their losses.
"""
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from agmc_jax.embed.gnn import AGMCEncoder, graph_data
from agmc_jax.errors import AgmcError


class State(NamedTuple):
    """`observe(t, counts, actions)` -> observation; `encoder` maps it to features (None: identity). A state whose
    observation reads the budget gives `bind(env) -> observe` for the environment the compiled search binds to
    its budget argument (`Budget.bound`), so one program serves every budget."""

    observe: Callable
    encoder: Any
    example: Any  # the observation at the start of an episode
    bind: Callable | None = None  # None: the observation does not depend on the budget


def agmc_state(env, hidden: int = 32) -> State:
    """AGMC: the step index and the actions so far, read through a GCN over the network and an LSTM."""
    steps = env.steps
    data = graph_data(env.net, env.kind.node_steps, steps)

    def observe(t, counts, actions):
        return {"t": jnp.asarray(t, jnp.int32), "actions": jnp.where(jnp.arange(steps) < t, actions, 0.0)}

    return State(observe, AGMCEncoder(data, hidden), observe(0, None, jnp.zeros(steps, jnp.float32)))


def amc_features(kind) -> np.ndarray:
    """AMC's static per-step features, min-max normalised: index, type, c_in, c_out, stride, kernel,
    #weights, MACs of the step."""
    rows = []
    for t, layers in enumerate(kind.step_layers):
        layer = layers[0]
        code = {"conv": 0.0, "grouped_conv": 0.0, "depthwise": 1.0, "dense": 2.0}[layer.kind]
        rows.append([t, code, layer.in_channels, layer.out_channels, max(layer.stride or (1,)),
                     max(layer.kernel_size or (1,)), sum(l.params for l in layers), kind.step_macs[t]])
    rows = np.array(rows, dtype=np.float64)
    span = rows.max(axis=0) - rows.min(axis=0)
    return ((rows - rows.min(axis=0)) / np.where(span > 0, span, 1)).astype(np.float32)


def amc_state(env, hidden: int = 32) -> State:
    """AMC: static features, MACs reduced so far, MACs still to come, previous action (all fractions)."""
    static = jnp.asarray(amc_features(env.kind))
    total = float(env.totals[0])
    step_macs = np.asarray(env.kind.step_macs, np.float64)
    still = jnp.asarray((step_macs.sum() - np.cumsum(step_macs)) / total, jnp.float32)

    def observe(t, counts, actions):
        reduced = (total - env.cost(counts, jnp)[0]) / total
        previous = jnp.where(t > 0, actions[jnp.maximum(t - 1, 0)], 1.0)
        return jnp.concatenate([static[t], jnp.stack([reduced, still[t], previous]).astype(jnp.float32)])

    return State(observe, None, observe(0, jnp.asarray(env.sizes, jnp.int32), jnp.zeros(env.steps, jnp.float32)))


def no_state(env, hidden: int = 32) -> State:
    """Nothing: for agents and rules that do not look (random search)."""
    def observe(t, counts, actions):
        return jnp.zeros((), jnp.float32)

    return State(observe, None, observe(0, None, None))


STATES = {"agmc": agmc_state, "amc": amc_state, "none": no_state}


def register_state(name: str, build) -> None:
    """Add (or replace) the state `name`: `build(env, ...)` -> `State`, what an agent of a method sees."""
    if not callable(build):
        raise AgmcError(f"register_state takes a function building a State, got {type(build).__name__}")
    STATES[name] = build
