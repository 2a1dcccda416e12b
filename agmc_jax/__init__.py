"""agmc-jax: automatic graph-based compression of convolutional networks in JAX."""
from agmc_jax import interrupts

interrupts.guard_startup()  # the `agmc` command: Ctrl-C while the modules below import ends it with one line

from agmc_jax import prune
from agmc_jax.agents import register_agent
from agmc_jax.compression import CompressConfig, Compressed, compress
from agmc_jax.data import register_dataset
from agmc_jax.embed import register_state
from agmc_jax.env import register_reward
from agmc_jax.errors import AgmcError
from agmc_jax.kinds import register_kind
from agmc_jax.models import register_model
from agmc_jax.prune.masks import register_criterion
from agmc_jax.graph import ChannelGroup, Layer, Network, trace
from agmc_jax.latency import latency_ms
from agmc_jax.portable import export_network, load_exported
from agmc_jax.reproduce import load_config, reproduce
from agmc_jax.search import METHODS, Method, SearchConfig, SearchResult, register_method, search
from agmc_jax.stages import STAGES, Stage, StageRun, register_stage

__all__ = ["AgmcError", "ChannelGroup", "CompressConfig", "Compressed", "Layer", "METHODS", "Method", "Network",
           "STAGES", "SearchConfig", "SearchResult", "Stage", "StageRun", "compress", "export_network", "latency_ms",
           "load_config", "load_exported", "prune", "register_agent", "register_criterion", "register_dataset",
           "register_kind", "register_method", "register_model", "register_reward", "register_stage", "register_state",
           "reproduce", "search", "trace"]
