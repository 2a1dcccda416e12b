"""`trace`: from a Linen module and its variables to layers, channel groups, counts and a graph.

Everything here is derived from the jaxpr of inference-mode `apply`; nothing is per architecture.
"""
import inspect

import flax.linen as nn
import jax
import numpy as np

from agmc_jax.errors import TraceError
from agmc_jax.graph.channels import analyse
from agmc_jax.graph.ir import abstract_like, flatten
from agmc_jax.graph.network import Network


def _call_kwargs(module):
    """Inference-mode keyword of the module's `__call__` (`train=False` or `deterministic=True`)."""
    names = inspect.signature(module.__call__).parameters
    if "train" in names:
        return {"train": False}
    if "training" in names:
        return {"training": False}
    if "deterministic" in names:
        return {"deterministic": True}
    return {}


def _path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def trace(module, variables, example_input, **call_kwargs):
    """Trace `module.apply(variables, x)` for one example shaped like `example_input`.

    `example_input` is an array (or ShapeDtypeStruct) with a leading batch axis, or an (H, W, C)
    shape tuple. Extra keyword arguments go to `apply`; by default `train=False` where accepted.
    """
    if not isinstance(module, nn.Module):
        raise TraceError(f"the module must be a flax.linen.Module, got {type(module).__name__}")
    if isinstance(example_input, (tuple, list)):
        example = jax.ShapeDtypeStruct((1, *example_input), np.float32)
    else:
        example = jax.ShapeDtypeStruct((1, *np.shape(example_input)[1:]), example_input.dtype)
    kwargs = call_kwargs or _call_kwargs(module)
    abstract = abstract_like(variables)
    try:
        closed = jax.make_jaxpr(lambda v, x: module.apply(v, x, **kwargs))(abstract, example)
    except Exception as error:  # any failure of the user's code: say what and where in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TraceError(f"cannot trace {type(module).__name__}.apply on input {example.shape}: "
                         f"{type(error).__name__}: {first}") from error
    if len(closed.jaxpr.outvars) != 1:
        raise TraceError(f"{type(module).__name__}.apply returns {len(closed.jaxpr.outvars)} arrays; "
                         "trace needs a module that returns one array of logits")
    program = flatten(closed)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    paths = [_path_names(p) for p, _ in leaves_with_paths]
    analysis = analyse(program, program.inputs[:-1], program.inputs[-1])
    return Network(module, kwargs, example, treedef, tuple(paths),
                   tuple(program.shapes[i] for i in program.inputs[:-1]), program, analysis)
