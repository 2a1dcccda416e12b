"""State encoders for the compression agents: AGMC's graph encoder-decoder and AMC's MLP heads."""
from agmc_jax.embed.gnn import (AGMCActor, AGMCCritic, AMCActor, AMCCritic, EncoderDecoder,
                                GraphData, GraphEncoder, example_obs, graph_data,
                                make_agmc_networks, previous_actions)

__all__ = ["GraphEncoder", "EncoderDecoder", "GraphData", "graph_data", "previous_actions",
           "AGMCActor", "AGMCCritic", "AMCActor", "AMCCritic", "example_obs", "make_agmc_networks"]
