"""Tracing a Linen model into layers, channel groups, MAC/parameter counts and a jraph graph."""
from agmc_jax.graph.network import ChannelGroup, Layer, Network
from agmc_jax.graph.trace import trace

__all__ = ["trace", "Network", "Layer", "ChannelGroup"]
