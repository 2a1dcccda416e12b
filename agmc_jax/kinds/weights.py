"""Fine-grained pruning (AGMC's `fg`): one step per layer, counts are the layer's weights kept.

A count keeps the layer's weights of largest magnitude. Costs count non-zero parameters and the
MACs of non-zero weights, both linear in the counts. The network keeps its shapes: the export is
the masked, sparse network.
"""
import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.errors import BudgetError
from agmc_jax.graph.graphs import node_layers
from agmc_jax.prune.masks import descending_ranks


def _multiply(variables, masks):
    return jax.tree.map(lambda v, m: v * m.astype(v.dtype), variables, masks)


class InPlace:
    """Masks that zero entries in place (no shape changes); a subclass gives `_keep(data, counts, xp)`, the 0/1
    mask tree of a policy in NumPy or jax.numpy."""

    def mask(self, data, counts):
        """The variables of the policy `counts`, masked (pure, traceable)."""
        return _multiply(data["variables"], self.keep(data, counts))

    def keep(self, data, counts):
        """The 0/1 multiplier of every variable for the policy (pure, traceable)."""
        return self._keep(data, counts, jnp)

    def masks(self, data, counts):
        """The 0/1 masks of the policy (host)."""
        return self._keep(data, np.asarray(counts), np)

    def export(self, variables, masks):
        """The network keeps its shapes: (module, masked variables)."""
        return self.net.module, _multiply(variables, masks)


class Weights(InPlace):
    """The per-layer weight kind: steps, exact sparse cost, magnitude masks, the sparse export."""

    unit = "weights"
    export_name = "sparse"
    default_budget = {"target_params": 0.5}
    criteria = ("l2", "l1")

    def __init__(self, net, config):
        if config.criterion not in ("l1", "l2"):
            raise BudgetError(f"fine-grained pruning keeps the largest weights; --criterion {config.criterion} "
                              "applies to channel pruning only")
        self.net = net
        self._leaves = tuple(op.leaf for op in net.analysis.layers)
        self.sizes = np.array([int(np.prod(net.shapes[leaf])) for leaf in self._leaves], np.int64)
        self.step_layers = [[layer] for layer in net.layers]
        self.step_macs = np.array([l.macs for l in net.layers], np.float64)
        self.node_steps = node_layers(net)
        self._weight_macs = self.step_macs / self.sizes  # MACs of one weight: its output positions (an integer)
        self._other_macs = float(net.macs - self.step_macs.sum())
        self._other_params = float(net.params - self.sizes.sum())

    def cost(self, counts, xp=np):
        """Non-zero parameters, and the MACs of non-zero weights, when layer t keeps counts[t] weights."""
        dtype = xp.float64 if xp is np else xp.float32
        counts = xp.asarray(counts, dtype)
        macs = self._other_macs + xp.sum(xp.asarray(self._weight_macs, dtype) * counts)
        return macs, self._other_params + xp.sum(counts)

    def layer_usage(self, counts):
        """Per layer: name, weights, weights kept (for reports)."""
        return [{"name": l.name, "out": int(size), "kept": int(c)}
                for l, size, c in zip(self.net.layers, self.sizes, counts)]

    def prepare(self, variables, calibration):
        """The arrays `mask` reads: the variables and each layer's weight ranks by magnitude (0 = largest)."""
        leaves = jax.tree.leaves(variables)
        ranks = tuple(descending_ranks(np.abs(np.asarray(leaves[leaf])).ravel()).reshape(leaves[leaf].shape)
                      .astype(np.int32) for leaf in self._leaves)
        return {"variables": variables, "ranks": ranks}

    def _keep(self, data, counts, xp):
        """Per variable leaf: the 0/1 mask keeping `counts[t]` weights of layer t (ones elsewhere)."""
        masks = [xp.ones(shape, xp.float32) for shape in self.net.shapes]
        for t, (leaf, rank) in enumerate(zip(self._leaves, data["ranks"])):
            masks[leaf] = (xp.asarray(rank) < counts[t]).astype(xp.float32)
        return jax.tree.unflatten(self.net.treedef, masks)
