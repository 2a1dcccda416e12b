"""The search as one compiled program, in purejaxrl's shape.

An episode is a `lax.scan` over steps (observe, act, wall). A round plays the agent's `width`
episodes from one agent state, scores them in one batched evaluation, then observes and learns
from each in turn. A chunk is a loop over rounds: one jitted function of (runner, key, data,
limit); the host sees the run once per chunk. Episode e draws its randomness from
`fold_in(key, e)`, so a search cut into chunks anywhere, or resumed, plays the same episodes, and
no round starts past `limit`, so the chunk length never depends on the search length. The budget is
an argument too (`Environment.data["budget"]`): a chunk that lowers to a program compiled before (the
same network, kind, method and settings, any budget) reuses it (`compiled`).
"""
import hashlib
from collections import OrderedDict
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


class Runner(NamedTuple):
    """What a chunk carries: the agent's state and the number of finished episodes."""

    agent: Any
    episode: jax.Array  # int32[]


class Played(NamedTuple):
    """Per round and episode of a chunk ([rounds, width, ...]); entries past the limit are padding."""

    counts: jax.Array
    accuracy: jax.Array
    reward: jax.Array


def _fills(env) -> bool:
    """Whether the environment raises each policy to its budget (`EnvConfig.fill`); duck-typed ones do not."""
    return bool(getattr(getattr(env, "config", None), "fill", False))


def play_episode(env, state, agent, agent_state, key):
    """(counts, actions, observations) of one episode, every step walled, then raised to the budget by one shared
    shift of the actions where the environment's config says `fill` (pure)."""
    def step(carry, t):
        counts, actions = carry
        obs = state.observe(t, counts, actions)
        action = agent.act(agent_state, obs, jax.random.fold_in(key, t), jnp.asarray(True))
        count = env.action_count(t, action, counts)
        return (counts.at[t].set(count), actions.at[t].set(env.count_action(t, count))), obs

    start = (jnp.asarray(env.sizes, jnp.int32), jnp.zeros(env.steps, jnp.float32))
    (counts, actions), observations = jax.lax.scan(step, start, jnp.arange(env.steps))
    if _fills(env):
        counts = env.filled(counts)
        actions = env.count_action(jnp.arange(env.steps), counts)
    return counts, actions, observations


def make_chunk(env, state, agent, rounds: int):
    """The jitted chunk: up to `rounds` rounds of `agent.width` episodes, scored, observed and learned from."""
    width = agent.width

    def observe_and_update(agent_state, episode):
        observations, actions, reward, key = episode
        agent_state = agent.observe(agent_state, observations, actions, reward)
        keys = jax.random.split(key, agent.updates)
        return jax.lax.scan(lambda s, k: (agent.update(s, k)[0], None), agent_state, keys)[0]

    def learn(agent_state, episode, active):
        if width == 1:  # a round only starts below the limit: its one episode always counts
            return observe_and_update(agent_state, episode), None
        return jax.lax.cond(active, observe_and_update, lambda s, e: s, agent_state, episode), None

    def play_round(runner, key, data, limit):
        index = runner.episode + jnp.arange(width)
        keys = jax.vmap(lambda e: jax.random.split(jax.random.fold_in(key, e)))(index)
        bound = env.bound(data["budget"]) if hasattr(env, "bound") else env  # the budget is an argument
        bind = getattr(state, "bind", None)
        seen = state if bind is None else state._replace(observe=bind(bound))
        counts, actions, observations = jax.vmap(
            lambda k: play_episode(bound, seen, agent, runner.agent, k))(keys[:, 0])
        accuracy = env.scores(data, counts).astype(jnp.float32)
        reward = jax.vmap(bound.reward)(accuracy, counts).astype(jnp.float32)
        active = index < limit
        agent_state, _ = jax.lax.scan(lambda s, x: learn(s, x[:4], x[4]), runner.agent,
                                      (observations, actions, reward, keys[:, 1], active))
        return Runner(agent_state, runner.episode + jnp.sum(active).astype(jnp.int32)), Played(counts, accuracy,
                                                                                              reward)

    def chunk(runner, key, data, limit):
        """Rounds while fewer than `limit` episodes are finished (a while loop: no work past the limit)."""
        played = Played(jnp.zeros((rounds, width, env.steps), jnp.int32), jnp.zeros((rounds, width), jnp.float32),
                        jnp.zeros((rounds, width), jnp.float32))

        def more(carry):
            round_, runner, _ = carry
            return (round_ < rounds) & (runner.episode < limit)

        def one(carry):
            round_, runner, played = carry
            runner, new = play_round(runner, key, data, limit)
            played = jax.tree.map(lambda all_, x: all_.at[round_].set(x), played, new)
            return round_ + 1, runner, played

        _, runner, played = jax.lax.while_loop(more, one, (jnp.zeros((), jnp.int32), runner, played))
        return runner, played

    replicated = NamedSharding(env.mesh, P())
    return jax.jit(chunk, out_shardings=replicated)


PROGRAMS_KEPT = 8  # compiled chunks kept in memory, the most recently used
_programs: OrderedDict = OrderedDict()  # sha256 of a lowered chunk's text -> its executable
_compiled = [0]  # chunks compiled by this process


def compiled(chunk, *args):
    """`chunk` (a `make_chunk`) compiled for `args`: the executable of an earlier chunk that lowered to the same
    program text for arguments of the same structure, shapes and dtypes, else a new one. Equal text is the same
    program, so a hit is exact, never an approximation."""
    lowered = chunk.lower(*args)
    leaves, structure = jax.tree.flatten(args)  # the text omits unused arguments: the call must still fit
    signature = f"{structure}{[(jnp.shape(x), jnp.result_type(x)) for x in leaves]}"
    key = hashlib.sha256((lowered.as_text() + signature).encode()).hexdigest()
    if key in _programs:
        _programs.move_to_end(key)
    else:
        _programs[key] = lowered.compile()
        _compiled[0] += 1
        while len(_programs) > PROGRAMS_KEPT:
            _programs.popitem(last=False)
    return _programs[key]


def compile_count() -> int:
    """How many search chunks this process has compiled (what the one-program-per-network tests count)."""
    return _compiled[0]


def place(env, runner):
    """The runner as the chunk returns it (replicated over the environment's mesh), so calls share one program."""
    return jax.device_put(runner, NamedSharding(env.mesh, P()))
