"""Registered agents: each is a config class, a builder over a state's encoder, and search-length defaults.

Agent settings belong to the agent: a search passes `options` (a dict, or `KEY=VALUE` strings from
the command line) which `agent_config` checks against the agent's config class.
"""
import math
import typing
from typing import Callable, NamedTuple

from agmc_jax.agents.annealing import AnnealingConfig, annealing
from agmc_jax.agents.annealing import check_config as check_annealing
from agmc_jax.agents.base import Agent
from agmc_jax.agents.ddpg import DDPGConfig, ddpg
from agmc_jax.agents.ddpg import check_config as check_ddpg
from agmc_jax.agents.heads import Actor, Critic
from agmc_jax.agents.ppo import PPOConfig, ppo
from agmc_jax.agents.ppo import check_config as check_ppo
from agmc_jax.agents.random_agent import RandomConfig, random_agent
from agmc_jax.agents.random_agent import check_config as check_random
from agmc_jax.errors import AgmcError
from agmc_jax.kinds.options import parse_value, type_words


class OptionError(AgmcError, ValueError):
    """An agent option that does not exist or has a value of the wrong type."""


class AgentType(NamedTuple):
    """build(config, state, steps) -> Agent; defaults(episodes) -> option values that depend on the search length;
    check(config) raises an `AgmcError` on values that cannot run, before anything is loaded or traced."""

    name: str
    config: type
    build: Callable[..., Agent]
    defaults: Callable[[int], dict] = lambda episodes: {}
    check: Callable[[NamedTuple], None] = lambda config: None


def _build_ddpg(config, state, steps):
    return ddpg(Actor(state.encoder), Critic(state.encoder), config, updates=config.updates_per_episode or steps)


def _ddpg_defaults(episodes):
    """AMC warms up for 100 of its 400+ episodes; shorter searches keep that quarter."""
    return {"warmup_episodes": min(100, max(1, episodes // 4))}


def _build_ppo(config, state, steps):
    heads = (config.hidden,)
    return ppo(Actor(state.encoder, heads), Critic(state.encoder, heads), config, steps)


AGENTS = {
    "ddpg": AgentType("ddpg", DDPGConfig, _build_ddpg, _ddpg_defaults, check_ddpg),
    "random": AgentType("random", RandomConfig, lambda config, state, steps: random_agent(config),
                        check=check_random),
    "ppo": AgentType("ppo", PPOConfig, _build_ppo, lambda episodes: {"anneal_episodes": episodes},
                     check_ppo),
    "annealing": AgentType("annealing", AnnealingConfig, lambda config, state, steps: annealing(config),
                           lambda episodes: {"cooling_episodes": episodes}, check_annealing),
}


def register_agent(agent: AgentType) -> AgentType:
    """Add (or replace) an agent under `agent.name`: methods name it, `agent_config` checks its options."""
    if not isinstance(agent, AgentType):
        raise AgmcError(f"register_agent takes an AgentType, got {type(agent).__name__}")
    AGENTS[agent.name] = agent
    return agent


def agent_config(agent: AgentType, options: dict | None = None, episodes: int = 100):
    """The agent's config: its defaults, the search-length defaults, then `options` (values or strings)."""
    config = agent.config()
    fields = config._fields
    unknown = sorted(set(options or {}) - set(fields))
    if unknown:
        raise OptionError(f"{agent.name} has no option {unknown[0]!r}; its options are: {', '.join(fields)}")
    values = {**agent.defaults(episodes)}
    hints = typing.get_type_hints(agent.config)
    for name, value in (options or {}).items():
        if isinstance(value, str):
            try:
                value = parse_value(value, hints[name], getattr(config, name))
            except ValueError:
                raise OptionError(f"{agent.name} option {name} takes {type_words(hints[name])}, got {value!r}") \
                    from None
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"{agent.name} option {name} must be a finite number, got {value}")
        values[name] = value
    config = config._replace(**values)
    agent.check(config)
    return config


def parse_options(pairs, flag: str = "--agent-option") -> dict:
    """`KEY=VALUE` strings (from `--agent-option`, or `flag`) as a dict of strings."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OptionError(f"{flag} takes KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options
