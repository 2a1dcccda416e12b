"""N:M structured sparsity as a compression kind added from outside agmc_jax: one module, one registration.

Per layer the search chooses dense or an N:M pattern: in every M consecutive input weights of each output,
at most N are non-zero (2:4 is what sparse tensor cores run; 4:8 keeps the same half with more freedom).
Costs count the non-zero parameters and their MACs; the export keeps the shapes, zeros in place.
`agmc --plugin examples.nm_sparsity search --kind nm --target-params 0.6 ...` uses it from the command line.
"""
import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.env import SLACK
from agmc_jax.errors import BudgetError
from agmc_jax.graph.graphs import node_layers
from agmc_jax.kinds import register_kind
from agmc_jax.kinds.weights import InPlace

PATTERNS = ((2, 4), (4, 8), (1, 1))  # (N, M) a step may take, least dense and least free first; (1, 1): dense


def pattern_mask(kernel: np.ndarray, n: int, m: int) -> np.ndarray:
    """The 0/1 mask keeping the n largest-magnitude weights of every m consecutive inputs (axis -2) of each
    output; ties go to the earlier weight."""
    shape = kernel.shape
    groups = np.abs(kernel).reshape(*shape[:-2], shape[-2] // m, m, shape[-1])
    order = np.argsort(-groups, axis=-2, kind="stable")
    ranks = np.argsort(order, axis=-2, kind="stable")
    return (ranks < n).astype(np.float32).reshape(shape)


class Patterns:
    """The action space: a count is the index (1-based) of a step's pattern in `PATTERNS`, an action in [0, 1]
    picks one of the len(PATTERNS) equal slices; budgets on MACs and parameters as fractions of the dense ones."""

    resources = ("macs", "params")

    def __init__(self, kind, config):
        if config.target_size is not None:
            raise BudgetError("N:M patterns take --target-params or --target-macs, not --target-size")
        self.kind, self.choices = kind, len(PATTERNS)
        self.low = np.ones(len(kind.sizes), np.int64)
        self.high = np.asarray(kind.sizes, np.int64)
        self.totals = np.array(kind.cost(self.high), np.float64)
        self.targets = np.array([np.inf if v is None else v * t for v, t in
                                 zip((config.target_macs, config.target_params), self.totals)], np.float64)
        if not self.feasible(self.low):
            lowest = np.array(kind.cost(self.low)) / self.totals
            raise BudgetError(f"every layer at {PATTERNS[0][0]}:{PATTERNS[0][1]} keeps {lowest[0]:.3f} of the MACs and "
                              f"{lowest[1]:.3f} of the parameters; raise the budget")

    def feasible(self, counts, xp=np):
        macs, params = self.kind.cost(counts, xp)
        slack = 1 + (SLACK if xp is np else 0.0)
        return (macs <= self.targets[0] * slack) & (params <= self.targets[1] * slack)

    def round_down(self, t, count):
        return count

    def wanted(self, t, action, dtype):
        return jnp.clip(jnp.floor(jnp.clip(action, 0.0, 1.0) * self.choices) + 1, 1, self.choices).astype(dtype)

    def action(self, t, count):
        return jnp.clip((count - 0.5) / self.choices, 0.0, 1.0)

    def uniform(self):
        """The densest single pattern every step can take within the budget."""
        fits = [c for c in range(1, self.choices + 1) if self.feasible(np.full(len(self.low), c))]
        return np.full(len(self.low), fits[-1], np.int64)


class NM(InPlace):
    """One step per conv or dense layer whose inputs split into groups of every pattern's M."""

    unit = "patterns"
    export_name = "sparse"
    default_budget = {"target_params": 0.6}

    def __init__(self, net, config):
        if config.criterion not in ("l1", "l2"):
            raise BudgetError("N:M patterns keep the largest weights of each group; give --criterion l1 or l2")
        widest = max(m for _, m in PATTERNS)
        layers = [(i, layer, op.leaf) for i, (layer, op) in enumerate(zip(net.layers, net.analysis.layers))
                  if layer.kind in ("conv", "dense") and net.shapes[op.leaf][-2] % widest == 0]
        if not layers:
            raise BudgetError(f"{type(net.module).__name__} has no conv or dense layer whose inputs are a multiple "
                              f"of {widest}")
        self.net = net
        self.leaves = tuple(leaf for _, _, leaf in layers)
        self.step_layers = [[layer] for _, layer, _ in layers]
        self.sizes = np.full(len(layers), len(PATTERNS), np.int64)
        self.step_macs = np.array([layer.macs for _, layer, _ in layers], np.float64)
        self._weights = np.array([np.prod(net.shapes[leaf]) for leaf in self.leaves], np.float64)
        self._other_macs = float(net.macs - self.step_macs.sum())
        self._other_params = float(net.params - self._weights.sum())
        step_of_layer = np.full(len(net.layers) + 1, -1, np.int32)  # the last entry maps non-layer nodes' -1
        step_of_layer[[i for i, _, _ in layers]] = np.arange(len(layers))
        self.node_steps = step_of_layer[node_layers(net)]

    def action_space(self, config):
        return Patterns(self, config)

    def cost(self, counts, xp=np):
        """(MACs, parameters) counting non-zero weights: a step at pattern N:M keeps N/M of its weights."""
        dtype = xp.float64 if xp is np else xp.float32
        density = xp.asarray([n / m for n, m in PATTERNS], dtype)[xp.asarray(counts) - 1]
        return (self._other_macs + xp.sum(xp.asarray(self.step_macs, dtype) * density),
                self._other_params + xp.sum(xp.asarray(self._weights, dtype) * density))

    def layer_usage(self, counts):
        return [{"name": layers[0].name, "out": int(w), "kept": int(w * PATTERNS[c - 1][0] / PATTERNS[c - 1][1]),
                 "pattern": "dense" if PATTERNS[c - 1] == (1, 1) else "{}:{}".format(*PATTERNS[c - 1])}
                for layers, w, c in zip(self.step_layers, self._weights, np.asarray(counts))]

    def prepare(self, variables, calibration):
        """The variables and, per step, the mask of every pattern (they depend on the weights only)."""
        leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(variables)]
        masks = tuple(np.stack([pattern_mask(leaves[leaf], n, m) for n, m in PATTERNS]) for leaf in self.leaves)
        return {"variables": variables, "patterns": masks}

    def _keep(self, data, counts, xp):
        masks = [xp.ones(shape, xp.float32) for shape in self.net.shapes]
        for t, (leaf, patterns) in enumerate(zip(self.leaves, data["patterns"])):
            masks[leaf] = xp.asarray(patterns)[counts[t] - 1]
        return jax.tree.unflatten(self.net.treedef, masks)


register_kind("nm", NM)
