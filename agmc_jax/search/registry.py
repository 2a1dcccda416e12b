"""The registry of search methods: each is a state, an agent (or a rule) and a compression kind.

`agmc_jax.search`, `agmc search/compress`, the checkpoint fingerprint and the experiments read
this table; adding a method is one entry (`register_method`), from inside the package or outside.
"""
from typing import Callable, NamedTuple

import jax.numpy as jnp

from agmc_jax.agents import AGENTS, AgentType, annealing_observation, annealing_start
from agmc_jax.embed import STATES, State
from agmc_jax.errors import AgmcError, BudgetError
from agmc_jax.kinds import KINDS


class UnknownMethodError(AgmcError, ValueError):
    """A search method that is not registered."""


class Method(NamedTuple):
    """A search method. `state(env, hidden) -> State`; `agent` learns from episodes, or `rule(env) -> counts`
    picks one policy without episodes; `kind` is the class of what a step compresses; `env_defaults` are
    `EnvConfig` fields it sets unless the caller does."""

    name: str
    description: str
    kind: type
    state: Callable | None = None
    agent: AgentType | None = None
    rule: Callable | None = None
    env_defaults: tuple = ()  # (field, value) pairs


def _uniform(env):
    """The largest single keep ratio within the budget (the handcrafted baseline)."""
    return env.uniform_counts()


def _annealing_state(env, hidden: int = 32) -> State:
    """Annealing's view: the step, the actions so far, each step's weights and its cap; the example adds the start
    policy at the budget."""
    observe = annealing_observation(env)
    example = observe(0, jnp.asarray(env.sizes, jnp.int32), jnp.zeros(env.steps, jnp.float32))
    return State(observe, None, {**example, "start": annealing_start(env)}, bind=annealing_observation)


METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add `method` to the registry (an error if its name is taken, unless `replace`)."""
    if (method.agent is None) == (method.rule is None):
        raise AgmcError(f"method {method.name!r} needs exactly one of an agent or a rule")
    if method.agent is not None and method.state is None:
        raise AgmcError(f"method {method.name!r} has an agent but no state")
    if method.name in METHODS and not replace:
        raise AgmcError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method `name`, or a typed error listing the registered ones."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def with_kind(method: Method, kind: str | None) -> Method:
    """`method` compressing `kind` (a name in KINDS) instead of its own kind; None keeps its own."""
    if kind is None:
        return method
    if kind not in KINDS:
        raise BudgetError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return method._replace(kind=KINDS[kind])


def default_criterion(method: str, kind: str | None = None) -> str:
    """The channel criterion `agmc compress` uses when none is given: the first of the kind's `criteria` (l2 for a
    kind that lists none)."""
    return getattr(with_kind(get_method(method), kind).kind, "criteria", ("l2",))[0]


def describe_methods() -> str:
    """One line of help: every method and what it is."""
    return "; ".join(f"{m.name}: {m.description}" for m in METHODS.values())


for _method in (
        Method("agmc", "GNN encoder-decoder states + DDPG, channels", KINDS["channels"], STATES["agmc"], AGENTS["ddpg"]),
        Method("amc", "AMC's rule-based states + DDPG, channels", KINDS["channels"], STATES["amc"], AGENTS["ddpg"]),
        Method("random", "random policies through the action wall, channels", KINDS["channels"], STATES["none"],
               AGENTS["random"]),
        Method("uniform", "one keep ratio everywhere, channels", KINDS["channels"], rule=_uniform),
        Method("ppo", "AMC's rule-based states + PPO with a Q critic, channels (two-stage DRL)", KINDS["channels"],
               STATES["amc"], AGENTS["ppo"]),
        Method("agmc-ppo", "GNN encoder-decoder states + PPO with a Q critic, channels", KINDS["channels"],
               STATES["agmc"], AGENTS["ppo"]),
        Method("fg", "GNN encoder-decoder states + DDPG, weights per layer (fine-grained)", KINDS["weights"],
               STATES["agmc"], AGENTS["ddpg"]),
        Method("haq", "AMC's rule-based states + DDPG, weight bits per layer (HAQ's setting)", KINDS["bits"],
               STATES["amc"], AGENTS["ddpg"]),
        Method("annealing", "simulated annealing with the experience rule, channels (one-shot masks)",
               KINDS["channels"], _annealing_state, AGENTS["annealing"], env_defaults=(("fill", True),)),
        Method("annealing_columns", "simulated annealing with the experience rule, columns per layer (masked)",
               KINDS["columns"], _annealing_state, AGENTS["annealing"], env_defaults=(("fill", True),))):
    register_method(_method)
