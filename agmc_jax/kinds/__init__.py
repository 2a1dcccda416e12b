"""Compression kinds: what a search step compresses, its exact cost model, the masks of a policy, the export.

A kind is built from a traced network and the environment's config; `prepare(variables, images)` turns the
variables (and the search's reward images, labels unused) into the arrays its pure `mask(data, counts)` reads,
so compiled evaluations take them as arguments. A kind may own options (`Options`, `check_options`: see
`agmc_jax.kinds.options`), given as the config's `kind_options`.
"""
from agmc_jax.kinds.bits import Bits, BitWidths
from agmc_jax.kinds.channels import Channels
from agmc_jax.kinds.columns import Columns
from agmc_jax.kinds.options import option_names, options_of, typed_options
from agmc_jax.kinds.weights import Weights

from agmc_jax.errors import AgmcError

KINDS = {"channels": Channels, "columns": Columns, "weights": Weights, "bits": Bits}
PROTOCOL = ("unit", "export_name", "default_budget", "cost", "layer_usage", "prepare", "mask", "masks", "export")


def register_kind(name: str, kind: type) -> type:
    """Add (or replace) the compression kind `name`, a class with the attributes of `PROTOCOL` built as
    `kind(net, env_config)` (optionally an `Options` NamedTuple and `check_options(options, env_config)`, read
    with `options_of`); `agmc search --kind` and `agmc_jax.search(kind=...)` then accept it."""
    missing = [attribute for attribute in PROTOCOL if not hasattr(kind, attribute)]
    if missing:
        raise AgmcError(f"kind {name!r} lacks {', '.join(missing)}; a kind defines {', '.join(PROTOCOL)}")
    KINDS[name] = kind
    return kind


def describe_kind_options() -> str:
    """One line of help: each kind that takes options, and their names."""
    taking = [f"{name}: {', '.join(option_names(kind))}" for name, kind in KINDS.items() if option_names(kind)]
    return "; ".join(taking) or "no kind takes options"


__all__ = ["KINDS", "PROTOCOL", "Bits", "BitWidths", "Channels", "Columns", "Weights", "describe_kind_options",
           "option_names", "options_of",
           "register_kind", "typed_options"]
