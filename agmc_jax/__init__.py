"""agmc-jax: automatic graph-based compression of convolutional networks in JAX."""
from agmc_jax import prune
from agmc_jax.errors import AgmcError
from agmc_jax.graph import ChannelGroup, Layer, Network, trace
from agmc_jax.latency import latency_ms
from agmc_jax.portable import export_network, load_exported
from agmc_jax.reproduce import load_config, reproduce
from agmc_jax.search import METHODS, Method, SearchConfig, SearchResult, register_method, search

__all__ = ["AgmcError", "ChannelGroup", "Layer", "METHODS", "Method", "Network", "export_network", "latency_ms",
           "load_config", "load_exported", "prune", "register_method", "reproduce", "trace", "search", "SearchConfig",
           "SearchResult"]
