"""Compression kinds: what a search step compresses, its exact cost model, the masks of a policy, the export.

A kind is built from a traced network and the environment's config; `prepare` turns the variables into
the arrays its pure `mask(data, counts)` reads, so compiled evaluations take them as arguments.
"""
from agmc_jax.kinds.bits import Bits, BitWidths
from agmc_jax.kinds.channels import Channels
from agmc_jax.kinds.columns import Columns
from agmc_jax.kinds.weights import Weights

KINDS = {"channels": Channels, "columns": Columns, "weights": Weights, "bits": Bits}

__all__ = ["KINDS", "Bits", "BitWidths", "Channels", "Columns", "Weights"]
