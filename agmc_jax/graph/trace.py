"""`trace`: from a Linen module and its variables to layers, channel groups, counts and a graph.

Everything here is derived from the jaxpr of inference-mode `apply`; nothing is per architecture.
"""
import dataclasses
import inspect
import warnings
from collections import Counter, defaultdict

import jax
import numpy as np

from agmc_jax.errors import TraceError
from agmc_jax.graph.channels import analyse
from agmc_jax.graph.ir import abstract_like, flatten


@dataclasses.dataclass(frozen=True)
class Layer:
    """A convolution or dense layer found in the program."""

    name: str  # the kernel's module path, e.g. 'BasicBlock_0/ConvBN_0/Conv_0'
    kind: str  # conv | depthwise | grouped_conv | dense
    kernel_path: tuple  # path of the kernel leaf in the variables
    in_channels: int
    out_channels: int
    kernel_size: tuple
    stride: tuple
    groups: int
    out_spatial: tuple
    macs: int  # multiply-accumulates per example
    params: int  # parameters of its module (kernel and bias)
    in_group: int  # channel group of its input features, -1 if none or several
    out_group: int  # channel group of its output features, -1 if none or several
    in_groups: tuple  # every channel group among its input features
    op_index: int


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channel units that must be removed together (e.g. a residual stage's shared channels)."""

    index: int
    size: int  # number of channels (units)
    producers: tuple  # names of layers whose output features are these channels
    consumers: tuple  # names of layers that read them
    macs: int  # MACs that disappear when every channel of the group goes


class AxisMap:
    """For one axis of one variable leaf: each index's group (-1 = fixed) and unit within the group."""

    def __init__(self, group: np.ndarray, unit: np.ndarray):
        self.group, self.unit = group, unit


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
    from agmc_jax.graph.network import Network

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


def build_groups(analysis, program, paths, layer_ops):
    """Channel groups and, for every axis of every leaf, which group/unit each index belongs to."""
    uf = analysis.uf
    n_leaves = len(paths)
    roots = [tuple(None if s is None else uf.roots(s) for s in analysis.axes[program.inputs[leaf]])
             for leaf in range(n_leaves)]
    occurrences = defaultdict(Counter)
    for leaf in range(n_leaves):
        for axis, r in enumerate(roots[leaf]):
            for root in r.tolist():
                occurrences[root][(leaf, axis)] += 1
    produced = {}
    for order, layer in enumerate(layer_ops):
        for position, root in enumerate(roots[layer.leaf][layer.out_axis].tolist()):
            produced.setdefault(root, (order, position))
    by_signature = defaultdict(list)
    for root, (order, position) in produced.items():
        if root in uf.frozen:
            continue
        signature = tuple(sorted(occurrences[root].items()))
        by_signature[signature].append((order, position, root))
    members = sorted(sorted(units) for units in by_signature.values())
    unit_of = {}
    for g, units in enumerate(members):
        for u, (_, _, root) in enumerate(units):
            unit_of[root] = (g, u)
    axis_maps = []
    for leaf in range(n_leaves):
        maps = []
        for r in roots[leaf]:
            pairs = np.array([unit_of.get(root, (-1, -1)) for root in r.tolist()], dtype=np.int64)
            pairs = pairs.reshape(-1, 2)
            maps.append(AxisMap(pairs[:, 0], pairs[:, 1]))
        axis_maps.append(tuple(maps))
    sizes = [len(units) for units in members]
    return sizes, axis_maps, {root: g for root, (g, _) in unit_of.items()}


def frozen_reasons(analysis, layer_ops, program):
    """One line per layer whose output channels cannot be pruned because of an unknown op."""
    uf = analysis.uf
    lines = []
    for layer in layer_ops:
        slots = analysis.axes[program.inputs[layer.leaf]][layer.out_axis]
        reasons = {uf.frozen[r] for r in uf.roots(slots).tolist() if r in uf.frozen}
        reasons -= {"the network's output"}
        lines.extend(f"{layer.where}: output channels not prunable: {why}"
                     for why in sorted(reasons) if why.startswith("operation") or "grouped" in why)
    for line in lines:
        warnings.warn(line, stacklevel=3)
    return tuple(lines)
