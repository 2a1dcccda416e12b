"""Channel pruning: one step per channel group, counts are channels kept, the export is physically smaller.

A count keeps the group's highest-ranked channels by the criterion (weight norm `l1`, `l2`; `infodrop`
learns its ranks on the search's reward images, labels unused, when the search is prepared); with
`lstsq` the layers that lose input channels are then refitted by least squares, AMC's
reconstruction, inside the compiled masking: the Gram matrices of the original network's inputs at
sampled positions of every reward image (a dense layer needs more images than inputs) do not depend
on the policy, so they are computed once and each policy only solves its kept rows.
"""
import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.graph.cost import evaluate_cost
from agmc_jax.graph.graphs import node_groups
from agmc_jax.prune.lstsq import refit_kernel, refit_layers, refit_systems
from agmc_jax.prune.masks import channel_ranks, masks_from_vectors
from agmc_jax.prune.slim import slim


def _axis_table(axis_map, ranks):
    """(group, rank, fixed) of every index of one variable axis: kept iff fixed or rank < counts[group]."""
    rank = np.array([ranks[g][u] if g >= 0 else 0 for g, u in zip(axis_map.group, axis_map.unit)], np.int32)
    return np.maximum(axis_map.group, 0).astype(np.int32), rank, axis_map.group < 0


def _axis_keep(table, counts):
    """The 0/1 keep vector of one table for per-group `counts` (traceable)."""
    group, rank, fixed = table
    return fixed | (rank < counts[group])


class Channels:
    """The channel-group kind: steps, exact cost, masks (optionally refitted) and the slimmed export."""

    unit = "channels"
    export_name = "slim"
    default_budget = {"target_macs": 0.5}
    criteria = ("lstsq", "l2", "l1", "infodrop")  # `agmc compress`'s default first: the proxy study's best cheap proxy

    def __init__(self, net, config):
        self.net, self.criterion = net, config.criterion
        self.sizes = np.array(net.group_sizes, np.int64)
        self.step_layers = [[l for l in net.layers if l.name in g.producers] for g in net.groups]
        self.step_macs = np.array([g.macs for g in net.groups], np.float64)
        self.node_steps = node_groups(net)
        self._masked_axes = tuple(tuple(axis for axis, m in enumerate(maps) if (m.group >= 0).any())
                                  if net.is_param[leaf] else () for leaf, maps in enumerate(net.axis_maps))
        self._refit_layers = refit_layers(net) if config.criterion == "lstsq" else ()
        self._refit_maps = tuple(net.axis_maps[layer.leaf][layer.in_axis] for layer in self._refit_layers)

    def cost(self, counts, xp=np):
        """(MACs, parameters) of the network keeping `counts[g]` channels of group g (`xp`: numpy or jax.numpy)."""
        return evaluate_cost(self.net.cost_model, counts, xp)

    def layer_usage(self, counts):
        """Per layer: name, output channels, channels kept (for reports)."""
        return [{"name": l.name, "out": l.out_channels,
                 "kept": int(counts[l.out_group]) if l.out_group >= 0 else l.out_channels} for l in self.net.layers]

    # ----- masking ----------------------------------------------------------------------------
    def prepare(self, variables, images):
        """The arrays `mask` reads: the variables, each masked axis's table and, for lstsq, the refit systems; and
        the channel ranks `masks` reads (criteria such as infodrop learn them on `images`, the reward images)."""
        ranks = channel_ranks(self.net, variables, self.criterion, images)
        tables = tuple(tuple(_axis_table(self.net.axis_maps[leaf][axis], ranks) for axis in axes)
                       for leaf, axes in enumerate(self._masked_axes))
        refits = tuple({"system": system, "table": _axis_table(m, ranks)} for m, system in
                       zip(self._refit_maps, refit_systems(self.net, variables, images, self._refit_layers)))
        return {"variables": variables, "tables": tables, "refits": refits, "ranks": tuple(ranks)}

    def mask(self, data, counts):
        """The variables of the policy `counts` at full size: dropped channels zeroed (pure, traceable)."""
        leaves = list(jax.tree.leaves(data["variables"]))
        for layer, refit in zip(self._refit_layers, data["refits"]):
            leaves[layer.leaf] = refit_kernel(leaves[layer.leaf], refit["system"], _axis_keep(refit["table"], counts))
        keep = jax.tree.leaves(self.keep(data, counts))
        return jax.tree.unflatten(self.net.treedef, [leaf * k.astype(leaf.dtype) for leaf, k in zip(leaves, keep)])

    def keep(self, data, counts):
        """The 0/1 multiplier of every variable for the policy `counts`, broadcastable to it (pure, traceable): what
        a masked fine-tune multiplies its parameters by after each step."""
        out = []
        for shape, axes, tables in zip(self.net.shapes, self._masked_axes, data["tables"]):
            keep = jnp.ones((1,) * len(shape), jnp.float32)
            for axis, table in zip(axes, tables):
                view = [1] * len(shape)
                view[axis] = shape[axis]
                keep = keep * _axis_keep(table, counts).astype(jnp.float32).reshape(view)
            out.append(keep)
        return jax.tree.unflatten(self.net.treedef, out)

    def masks(self, data, counts):
        """The 0/1 mask pytree of the policy (host), as `agmc_jax.prune` and the slimming read it."""
        vectors = [np.asarray(rank) < int(count) for count, rank in zip(counts, data["ranks"])]
        return masks_from_vectors(self.net, vectors)

    def export(self, variables, masks):
        """The physically smaller (module, variables) computing what the masked network does."""
        return slim(self.net, variables, masks)
