"""Tracing a Linen model into layers, channel groups, MAC/parameter counts and a jraph graph."""
from agmc_jax.graph.network import Network
from agmc_jax.graph.trace import ChannelGroup, Layer, trace

__all__ = ["trace", "Network", "Layer", "ChannelGroup"]
