"""Fine-grained pruning (AGMC's `fg` method): per-layer weight sparsity under a parameter budget.

Each step is one convolution or dense layer and an action keeps a fraction of its weights, those
of largest magnitude. Costs count non-zero weights (parameters) and the MACs of non-zero weights,
so both budgets are linear in the kept counts; the action wall, rounding and rewards are the
channel environment's. The network keeps its shapes: the export is the masked, sparse network.
"""
import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.env import BudgetError, EnvConfig, Environment
from agmc_jax.prune.masks import descending_ranks


class FineGrainedEnvironment(Environment):
    """An `Environment` whose steps are layers and whose counts are weights kept per layer."""

    unit = "weights"

    def __init__(self, net, variables, images, labels, config: EnvConfig = EnvConfig(target_macs=None,
                                                                                      target_params=0.5)):
        if config.criterion == "lstsq":
            raise BudgetError("fine-grained pruning keeps the largest weights; --criterion lstsq applies to "
                              "channel pruning only")
        super().__init__(net, variables, images, labels, config)

    # ----- steps: one layer each ------------------------------------------------------------
    def _step_layers(self):
        return [[layer] for layer in self.net.layers]

    def _step_size(self, t):
        return int(np.prod(self.net.shapes[self.net.analysis.layers[t].leaf]))

    def _step_macs(self, t):
        return self.net.layers[t].macs

    def layer_usage(self, counts):
        return [{"name": l.name, "out": int(size), "kept": int(c)}
                for l, size, c in zip(self.net.layers, self.sizes, counts)]

    def cost(self, counts):
        """Non-zero parameters, and the MACs of non-zero weights, when layer t keeps counts[t] weights."""
        kept = np.asarray(counts, np.float64) / self.sizes
        macs = self.net.macs - sum(l.macs * (1 - k) for l, k in zip(self.net.layers, kept))
        return {"macs": float(macs), "params": float(self.net.params - self.sizes.sum() + np.sum(counts))}

    # ----- masks ----------------------------------------------------------------------------
    def _rank_tables(self, variables):
        """Per layer: each weight's rank by magnitude (0 = largest, ties broken by position)."""
        leaves = jax.tree.leaves(variables)
        self._ranks = {}
        for t, op in enumerate(self.net.analysis.layers):
            magnitude = np.abs(np.asarray(leaves[op.leaf])).ravel()
            rank = descending_ranks(magnitude)
            self._ranks[op.leaf] = (t, rank.reshape(leaves[op.leaf].shape).astype(np.int32))

    def _masks(self, counts, xp):
        """The 0/1 mask pytree keeping the `counts[t]` largest weights of layer t (`xp`: numpy or jax.numpy)."""
        leaves = [(xp.asarray(self._ranks[i][1]) < counts[self._ranks[i][0]]).astype(xp.float32)
                  if i in self._ranks else xp.ones(shape, xp.float32) for i, shape in enumerate(self.net.shapes)]
        return jax.tree.unflatten(self.net.treedef, leaves)

    def masked_variables(self, counts):
        """Variables keeping the `counts[t]` largest weights of layer t (pure, traceable)."""
        return jax.tree.map(lambda v, m: v * m.astype(v.dtype), self.variables, self._masks(counts, jnp))

    def _prune(self, counts):
        """(variables, masks) of the policy: the sparse network and its 0/1 weight masks."""
        masks = self._masks(np.asarray(counts), np)
        return jax.tree.map(lambda v, m: v * m.astype(v.dtype), self.variables, masks), masks

    def export(self, variables, masks):
        """The sparse network keeps its shapes: (module, masked variables)."""
        return self.net.module, variables
