"""`Network`: the traced view of a model that pruning, the graph encoder and the search share."""
from functools import cached_property

import jax
import numpy as np

from agmc_jax.errors import MaskError
from agmc_jax.graph.trace import ChannelGroup, Layer, build_groups, frozen_reasons


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
        self._cost_tables()
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
    def _cost_tables(self):
        """Linear tables so that kept indices per (leaf, axis) = fixed + multiplicity @ counts."""
        n_groups = len(self.group_sizes)
        sizes = np.maximum(np.array(self.group_sizes, dtype=np.float64), 1)
        self._axis_index, fixed, mult = {}, [], []
        for leaf, maps in enumerate(self.axis_maps):
            for axis, m in enumerate(maps):
                self._axis_index[leaf, axis] = len(fixed)
                fixed.append(np.sum(m.group < 0))
                mult.append(np.bincount(m.group[m.group >= 0], minlength=n_groups) / sizes)
        self._fixed = np.array(fixed, dtype=np.float64)
        self._mult = np.array(mult, dtype=np.float64).reshape(len(fixed), n_groups)
        self._layer_axes = np.array([[self._axis_index[op.leaf, op.in_axis],
                                      self._axis_index[op.leaf, op.out_axis]]
                                     for op in self.analysis.layers], dtype=np.int64).reshape(-1, 2)
        self._layer_macs = np.array([op.macs for op in self.analysis.layers], dtype=np.float64)
        self._axis_size = np.array([len(m.group) for maps in self.axis_maps for m in maps],
                                   dtype=np.float64)
        self._param_leaves = [(leaf, [self._axis_index[leaf, a] for a in range(len(maps))])
                              for leaf, maps in enumerate(self.axis_maps) if self.is_param[leaf]]

    def kept_per_axis(self, counts):
        """Kept indices of every (leaf, axis) when group g keeps counts[g] channels."""
        return self._fixed + self._mult @ np.asarray(counts, dtype=np.float64)

    def cost(self, counts):
        """(MACs per example, parameters) of the network that keeps counts[g] channels of group g."""
        kept = self.kept_per_axis(counts)
        fraction = kept / np.maximum(self._axis_size, 1)
        macs = float(np.sum(self._layer_macs * np.prod(fraction[self._layer_axes], axis=1)))
        params = float(sum(np.prod(kept[axes]) if axes else 1.0 for _, axes in self._param_leaves))
        return macs, params

    def layer_macs(self, counts):
        """MACs per layer for a policy of kept counts per group."""
        fraction = self.kept_per_axis(counts) / np.maximum(self._axis_size, 1)
        return self._layer_macs * np.prod(fraction[self._layer_axes], axis=1)

    # ----- policies ----------------------------------------------------------------------
    def keep_counts(self, keep):
        """Channels kept per group from ratios in (0, 1], counts, or boolean vectors."""
        from agmc_jax.prune.masks import keep_counts
        return keep_counts(self, keep)

    def masks(self, variables, keep, criterion="l2"):
        """A mask pytree shaped like `variables` that keeps, per group, the best channels."""
        from agmc_jax.prune.masks import channel_masks
        return channel_masks(self, variables, keep, criterion)

    def apply_masks(self, variables, masks):
        """Variables with masked entries zeroed: `module.apply(result, x)` is the pruned network."""
        from agmc_jax.prune.masks import apply_masks
        return apply_masks(self, variables, masks)

    def reconstruct(self, variables, masks, images, positions=10, seed=0):
        """Variables whose layers that lost input channels are refitted by least squares (AMC)."""
        from agmc_jax.prune.lstsq import reconstruct
        from agmc_jax.prune.masks import vectors_from_masks
        return reconstruct(self, variables, vectors_from_masks(self, masks), images, positions, seed)

    def recalibrate(self, variables, images):
        """Variables whose BatchNorm statistics are re-estimated on `images` (pass the masked variables)."""
        from agmc_jax.prune.batchnorm import recalibrate
        return recalibrate(self.module, variables, images, **self.call_kwargs)

    def weight_masks(self, variables, keep):
        """Fine-grained masks: per layer, keep the largest-magnitude fraction `keep[name]` of weights."""
        from agmc_jax.prune.masks import weight_masks
        return weight_masks(self, variables, keep)

    def slim(self, variables, masks):
        """The physically smaller (module, variables) that computes what the masked network does."""
        from agmc_jax.prune.slim import slim
        return slim(self, variables, masks)

    @cached_property
    def graph(self):
        """The computational graph as a jraph GraphsTuple (see `agmc_jax.graph.graphs`)."""
        from agmc_jax.graph.graphs import computational_graph
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
