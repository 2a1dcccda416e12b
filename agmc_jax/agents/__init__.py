"""Agents that choose one action per step: (init, act, observe, update) pure functions, and their registry."""
from agmc_jax.agents.annealing import (AnnealingConfig, AnnealingState, annealing, annealing_observation,
                                       annealing_start, experience_interval)
from agmc_jax.agents.base import Agent
from agmc_jax.agents.ddpg import DDPGConfig, DDPGState, ddpg
from agmc_jax.agents.heads import MLP, Actor, Critic
from agmc_jax.agents.ppo import PPOConfig, PPOState, ppo
from agmc_jax.agents.random_agent import RandomConfig, random_agent
from agmc_jax.agents.registry import AGENTS, AgentType, OptionError, agent_config, parse_options, register_agent

__all__ = ["AGENTS", "Agent", "AgentType", "Actor", "AnnealingConfig", "AnnealingState", "Critic", "DDPGConfig",
           "DDPGState", "MLP", "OptionError", "PPOConfig", "PPOState", "RandomConfig", "agent_config", "annealing",
           "annealing_observation", "annealing_start", "ddpg", "experience_interval", "parse_options", "ppo",
           "random_agent", "register_agent"]
