"""agmc-jax: automatic graph-based compression of convolutional networks in JAX."""
from agmc_jax import prune
from agmc_jax.errors import AgmcError
from agmc_jax.graph import ChannelGroup, Layer, Network, trace
from agmc_jax.search import SearchConfig, SearchResult, search

__all__ = ["AgmcError", "ChannelGroup", "Layer", "Network", "prune", "trace", "search", "SearchConfig",
           "SearchResult"]
