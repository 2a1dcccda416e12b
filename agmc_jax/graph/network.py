"""`Network`: the traced view of a model that pruning, the graph encoder and the search share."""
import dataclasses
from functools import cached_property

import jax
import numpy as np

from agmc_jax.errors import MaskError
from agmc_jax.graph.cost import cost_model, evaluate_cost, layer_macs
from agmc_jax.graph.graphs import computational_graph
from agmc_jax.graph.groups import build_groups, frozen_reasons, keep_counts


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


def _module_prefix(path):
    return tuple(path[1:-1])


def _single_group(groups: np.ndarray) -> int:
    """The one channel group an axis belongs to; -1 when it has none or several (after a concatenation)."""
    found = set(groups[groups >= 0].tolist())
    return found.pop() if len(found) == 1 else -1


class Network:
    """Layers, channel groups, exact cost model and graph of one traced module.

    Keep policies are given per group, as ratios in (0, 1], counts, or boolean vectors.
    """

    def __init__(self, module, call_kwargs, example, treedef, paths, shapes, program, analysis):
        self.module, self.call_kwargs, self.example = module, call_kwargs, example
        self.treedef, self.paths, self.shapes = treedef, paths, shapes
        self.program, self.analysis = program, analysis
        layer_ops = analysis.layers
        self.group_sizes, self.axis_maps, self._root_group = build_groups(analysis, program, paths, layer_ops)
        self.warnings = frozen_reasons(analysis, layer_ops, program)
        self.is_param = np.array([p[0] == "params" for p in paths])
        self.layers = tuple(self._layer(op) for op in layer_ops)
        self.cost_model = cost_model(self.axis_maps, self.is_param, layer_ops, self.group_sizes)
        self.macs, self.params = (int(v) for v in self.cost(np.array(self.group_sizes)))
        self.groups = tuple(self._group(g) for g in range(len(self.group_sizes)))

    # ----- description -------------------------------------------------------------------
    def _layer(self, op):
        shape = self.shapes[op.leaf]
        path = self.paths[op.leaf]
        spatial_axes = [a for a in range(len(shape)) if a not in (op.in_axis, op.out_axis)]
        params_op = self.program.ops[op.op_index].params
        out_shape = self.program.shapes[self.program.ops[op.op_index].outputs[0]]
        prefix = _module_prefix(path)
        params = sum(int(np.prod(s)) for p, s in zip(self.paths, self.shapes)
                     if p[0] == "params" and _module_prefix(p) == prefix)
        groups = params_op.get("feature_group_count", 1)
        in_maps = self.axis_maps[op.leaf][op.out_axis if op.kind == "depthwise" else op.in_axis].group
        out_maps = self.axis_maps[op.leaf][op.out_axis].group
        return Layer(
            name="/".join(str(k) for k in prefix), kind=op.kind, kernel_path=path,
            in_channels=shape[op.in_axis] * groups, out_channels=shape[op.out_axis],
            kernel_size=tuple(shape[a] for a in spatial_axes),
            stride=tuple(params_op.get("window_strides", ())), groups=groups,
            out_spatial=tuple(out_shape[1:-1]), macs=op.macs, params=params,
            in_group=_single_group(in_maps), out_group=_single_group(out_maps),
            in_groups=tuple(sorted(set(in_maps[in_maps >= 0].tolist()))), op_index=op.op_index)

    def _group(self, g):
        counts = np.array(self.group_sizes)
        counts[g] = 0
        producers = tuple(l.name for l in self.layers if l.out_group == g)
        consumers = tuple(l.name for l in self.layers if g in l.in_groups and l.name not in producers)
        return ChannelGroup(g, self.group_sizes[g], producers, consumers,
                            int(self.macs - self.cost(counts)[0]))

    def value_group(self, value: int) -> int:
        """Channel group of the last axis of program value `value` (-1: none or not prunable)."""
        slots = self.analysis.axes.get(value)
        if not slots or slots[-1] is None:
            return -1
        groups = {self._root_group.get(r, -1) for r in self.analysis.uf.roots(slots[-1]).tolist()}
        return groups.pop() if len(groups) == 1 else -1

    # ----- exact cost model --------------------------------------------------------------
    def cost(self, counts):
        """(MACs per example, parameters) of the network that keeps counts[g] channels of group g."""
        macs, params = evaluate_cost(self.cost_model, counts)
        return float(macs), float(params)

    def layer_macs(self, counts):
        """MACs per layer for a policy of kept counts per group."""
        return layer_macs(self.cost_model, counts)

    # ----- policies ----------------------------------------------------------------------
    def keep_counts(self, keep):
        """Channels kept per group from ratios in (0, 1], counts, or boolean vectors."""
        return keep_counts(self.group_sizes, keep)

    @cached_property
    def graph(self):
        """The computational graph as a jraph GraphsTuple (see `agmc_jax.graph.graphs`)."""
        return computational_graph(self)

    def check_variables(self, variables):
        """Raise MaskError unless `variables` has this network's structure and shapes."""
        leaves, treedef = jax.tree.flatten(variables)
        if treedef != self.treedef or any(np.shape(x) != s for x, s in zip(leaves, self.shapes)):
            raise MaskError("variables or masks do not match the traced network "
                            "(different structure or shapes); trace this network again")
        return leaves

    def summary(self):
        """A JSON-ready description: totals, layers and groups."""
        return {
            "model": type(self.module).__name__, "input_shape": list(self.example.shape[1:]),
            "params": self.params, "macs": self.macs,
            "layers": [{"name": l.name, "kind": l.kind, "in": l.in_channels, "out": l.out_channels,
                        "kernel": list(l.kernel_size), "stride": list(l.stride), "groups": l.groups,
                        "out_spatial": list(l.out_spatial), "macs": l.macs, "params": l.params,
                        "in_group": l.in_group, "out_group": l.out_group} for l in self.layers],
            "groups": [{"index": g.index, "channels": g.size, "producers": list(g.producers),
                        "consumers": list(g.consumers), "macs": g.macs} for g in self.groups],
            "warnings": list(self.warnings),
        }
