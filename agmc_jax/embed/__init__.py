"""What agents see: AGMC's graph encoder-decoder and AMC's rule-based state, as registered `STATES`."""
from agmc_jax.embed.gnn import AGMCEncoder, EncoderDecoder, GraphData, GraphEncoder, graph_data, previous_actions
from agmc_jax.embed.states import STATES, State, agmc_state, amc_features, amc_state, no_state, register_state

__all__ = ["AGMCEncoder", "EncoderDecoder", "GraphData", "GraphEncoder", "graph_data", "previous_actions",
           "STATES", "State", "agmc_state", "amc_features", "amc_state", "no_state", "register_state"]
