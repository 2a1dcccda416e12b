"""Column pruning (AutoCompress's second structure): one step per layer, counts are the layer's columns kept.

A column is one (kh, kw, c_in) position of a kernel: a vector over the output channels, as in the
im2col matrix of the convolution (an input feature of a dense layer). A count keeps the layer's
columns of largest L2 (or L1) norm. Costs are linear in the counts: a column holds `c_out`
parameters and costs `c_out` MACs per output position. No tensor changes shape: the export is the
masked network (its zeros stay zero when fine-tuned).
"""
import jax
import numpy as np

from agmc_jax.errors import BudgetError
from agmc_jax.graph.graphs import node_layers
from agmc_jax.kinds.weights import InPlace
from agmc_jax.prune.masks import descending_ranks

NORMS = {"l1": 1, "l2": 2}


class Columns(InPlace):
    """The per-layer column kind: steps, exact cost, column masks by norm, the masked export."""

    unit = "columns"
    export_name = "sparse"
    default_budget = {"target_macs": 0.5}
    criteria = ("l2", "l1")

    def __init__(self, net, config):
        if config.criterion not in NORMS:
            raise BudgetError(f"column pruning keeps the columns of largest norm: --criterion l1 or l2, "
                              f"got {config.criterion}")
        self.net, self._power = net, NORMS[config.criterion]
        ops = net.analysis.layers
        self._leaves = tuple(op.leaf for op in ops)
        self._out_axes = tuple(op.out_axis for op in ops)
        outputs = np.array([net.shapes[op.leaf][op.out_axis] for op in ops], np.int64)
        self.sizes = np.array([int(np.prod(net.shapes[op.leaf])) for op in ops], np.int64) // outputs
        self.step_layers = [[layer] for layer in net.layers]
        self.step_macs = np.array([l.macs for l in net.layers], np.float64)
        self.node_steps = node_layers(net)
        self._column_macs = self.step_macs / self.sizes  # MACs of one column: c_out x output positions
        self._column_params = outputs.astype(np.float64)
        self._other_macs = float(net.macs - self.step_macs.sum())
        self._other_params = float(net.params - (self.sizes * outputs).sum())

    def cost(self, counts, xp=np):
        """(MACs, parameters) when layer t keeps counts[t] columns (its other columns are zero)."""
        dtype = xp.float64 if xp is np else xp.float32
        counts = xp.asarray(counts, dtype)
        macs = self._other_macs + xp.sum(xp.asarray(self._column_macs, dtype) * counts)
        return macs, self._other_params + xp.sum(xp.asarray(self._column_params, dtype) * counts)

    def layer_usage(self, counts):
        """Per layer: name, columns, columns kept (for reports)."""
        return [{"name": l.name, "out": int(size), "kept": int(c)}
                for l, size, c in zip(self.net.layers, self.sizes, counts)]

    def prepare(self, variables, calibration):
        """The arrays `mask` reads: the variables and each layer's column ranks by norm (0 = largest)."""
        leaves = jax.tree.leaves(variables)
        ranks = []
        for leaf, axis in zip(self._leaves, self._out_axes):
            norms = np.sum(np.abs(np.asarray(leaves[leaf], np.float64)) ** self._power, axis=axis)
            ranks.append(descending_ranks(norms.ravel()).reshape(norms.shape).astype(np.int32))
        return {"variables": variables, "ranks": tuple(ranks)}

    def _keep(self, data, counts, xp):
        """Per variable leaf: the 0/1 mask keeping `counts[t]` columns of layer t (ones elsewhere)."""
        masks = [xp.ones(shape, xp.float32) for shape in self.net.shapes]
        for t, (leaf, axis, rank) in enumerate(zip(self._leaves, self._out_axes, data["ranks"])):
            masks[leaf] = xp.broadcast_to(xp.expand_dims(xp.asarray(rank) < counts[t], axis),
                                          self.net.shapes[leaf]).astype(xp.float32)
        return jax.tree.unflatten(self.net.treedef, masks)
