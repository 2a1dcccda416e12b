"""Purification (AutoCompress): remove the channels a structured-pruned network no longer uses.

After hard masks, a channel can be useless without having been chosen: every column that reads it
is zero (column pruning took them, or the layers that read it lost all their filters), so the
filters that make it are redundant; or everything that makes it is zero (its filters, bias and
BatchNorm scale and shift), so it carries exactly zero and the columns that read it are redundant.
Removing such a channel from every leaf that carries it changes no output (activations are assumed
to map 0 to 0, as ReLU, pooling and a zero-scale, zero-shift BatchNorm do). Removals can free
further channels, so the search runs to a fixed point; a group always keeps one channel.
"""
from typing import NamedTuple

import jax
import numpy as np

from agmc_jax.prune.masks import masks_from_vectors, vectors_from_masks


class Purified(NamedTuple):
    """The purified masks, each group's keep vector, and the cost before and after (see `sparse_cost`)."""

    masks: object
    vectors: list
    removed: list  # per group: channels purification removed
    before: tuple  # (MACs, parameters) of the masks given
    after: tuple  # (MACs, parameters) of the purified masks


def sparse_cost(net, masks) -> tuple:
    """(MACs per example, parameters) of the weights `masks` keep: a kept weight costs its output positions.

    For channel masks this is `net.cost(counts)`; column or weight masks count only what they keep.
    """
    leaves = net.check_variables(masks)
    params = sum(int(np.count_nonzero(np.asarray(m))) for m, p in zip(leaves, net.is_param) if p)
    macs = sum(int(np.count_nonzero(np.asarray(leaves[op.leaf]))) * op.macs // int(np.prod(net.shapes[op.leaf]))
               for op in net.analysis.layers)
    return float(macs), float(params)


def _sides(net):
    """Per (leaf, axis) of every parameter: whether it reads channels (a layer's input) and whether it makes
    them (everything else; a depthwise kernel's channel axis does both)."""
    reads = {(op.leaf, op.in_axis) for op in net.analysis.layers if op.kind != "depthwise"}
    reads |= {(op.leaf, op.out_axis) for op in net.analysis.layers if op.kind == "depthwise"}
    makes = {(leaf, axis) for leaf, maps in enumerate(net.axis_maps) if net.is_param[leaf]
             for axis in range(len(maps))} - {(op.leaf, op.in_axis) for op in net.analysis.layers
                                               if op.kind != "depthwise"}
    return reads, makes


def _alive(net, values, pairs):
    """Per group: whether each channel has a non-zero entry among the (leaf, axis) `pairs`."""
    alive = [np.zeros(s, bool) for s in net.group_sizes]
    for leaf, axis in pairs:
        m = net.axis_maps[leaf][axis]
        chosen = m.group >= 0
        if not chosen.any():
            continue
        value = np.moveaxis(values[leaf] != 0, axis, 0)
        nonzero = value.reshape(value.shape[0], -1).any(axis=1)
        for g in np.unique(m.group[chosen]):
            here = m.group == g
            np.logical_or.at(alive[g], m.unit[here], nonzero[here])
    return alive


def purify(net, variables, masks) -> Purified:
    """Masks without the channels that `variables * masks` neither makes nor reads (outputs unchanged)."""
    leaves = [np.asarray(v) for v in net.check_variables(variables)]
    mask_leaves = [np.asarray(m) for m in net.check_variables(masks)]
    reads, makes = _sides(net)
    vectors = [v.copy() for v in vectors_from_masks(net, masks)]
    start = [int(v.sum()) for v in vectors]
    while True:
        channel = [np.asarray(m) for m in net.check_variables(masks_from_vectors(net, vectors))]
        values = [v * m * c for v, m, c in zip(leaves, mask_leaves, channel)]
        used = [r & m for r, m in zip(_alive(net, values, reads), _alive(net, values, makes))]
        changed = False
        for g, (vector, keep) in enumerate(zip(vectors, used)):
            keep = vector & keep
            if not keep.any():
                keep = np.zeros_like(vector)
                keep[np.flatnonzero(vector)[0]] = True
            changed |= bool((keep != vector).any())
            vectors[g] = keep
        if not changed:
            break
    purified = masks_from_vectors(net, vectors)
    purified = jax.tree.map(lambda m, c: np.asarray(m) * c, masks, purified)
    return Purified(purified, vectors, [s - int(v.sum()) for s, v in zip(start, vectors)], sparse_cost(net, masks),
                    sparse_cost(net, purified))
