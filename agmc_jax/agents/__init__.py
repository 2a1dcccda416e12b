"""Agents that choose one keep ratio per prunable layer group: (init, act, observe, update) pure functions."""
from agmc_jax.agents.ddpg import Agent, DDPGConfig, DDPGState, ddpg
from agmc_jax.agents.random_agent import random_agent

__all__ = ["Agent", "DDPGConfig", "DDPGState", "ddpg", "random_agent"]
