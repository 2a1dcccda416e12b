"""Mask pytrees: which channels (or weights) a pruned network keeps, and applying them."""
from numbers import Number

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.errors import MaskError
from agmc_jax.graph.groups import per_group, ratio_count


def _norms(power):
    """The criterion scoring each channel by the L`power` norm of the weights that produce it."""
    def norm_scores(net, variables, calibration=None):
        leaves = net.check_variables(variables)
        scores = [np.zeros(s) for s in net.group_sizes]
        for op in net.analysis.layers:
            m = net.axis_maps[op.leaf][op.out_axis]
            w = np.moveaxis(np.abs(np.asarray(leaves[op.leaf], np.float64)) ** power, op.out_axis, 0)
            per_index = w.reshape(w.shape[0], -1).sum(axis=1)
            for g in np.unique(m.group[m.group >= 0]):
                chosen = m.group == g
                np.add.at(scores[g], m.unit[chosen], per_index[chosen])
        return [s if power == 1 else np.sqrt(s) for s in scores]
    return norm_scores


# name -> scores(net, variables, calibration images or None) -> one score per channel per group
CRITERIA = {"l1": _norms(1), "l2": _norms(2), "lstsq": _norms(2)}


def register_criterion(name, scores):
    """Add a channel criterion `scores(net, variables, calibration) -> [per-group scores]` (an error if taken)."""
    if name in CRITERIA:
        raise MaskError(f"a criterion named {name!r} is already registered")
    CRITERIA[name] = scores
    return scores


def channel_importance(net, variables, criterion="l2", calibration=None):
    """Per group, one score per channel as `criterion` rates it (`calibration`: images, for criteria that
    read activations)."""
    if criterion not in CRITERIA:
        raise MaskError(f"unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    net.check_variables(variables)
    return CRITERIA[criterion](net, variables, calibration)


def descending_ranks(values):
    """Each entry's rank by value, largest first (ties broken by position): `rank < k` keeps the top k."""
    return np.argsort(np.argsort(-values, kind="stable"), kind="stable")


def channel_ranks(net, variables, criterion="l2", calibration=None):
    """Per group, each channel's rank by importance (0 = most important, ties broken by index)."""
    return [descending_ranks(score) for score in channel_importance(net, variables, criterion, calibration)]


def top_channels(net, variables, counts, criterion="l2", calibration=None):
    """Boolean keep vector per group holding its `counts[g]` highest-scoring channels."""
    return [rank < int(count) for count, rank in zip(counts, channel_ranks(net, variables, criterion, calibration))]


def keep_vectors(net, variables, keep, criterion="l2", calibration=None):
    """Boolean keep vector per group: given vectors as they are, else the top-scoring channels."""
    vectors = top_channels(net, variables, net.keep_counts(keep), criterion, calibration)
    for g, value in per_group(keep).items():
        if np.asarray(value).dtype == bool:
            vectors[g] = np.asarray(value).copy()
    return vectors


def _axis_keep(axis_map, vectors):
    keep = np.ones(len(axis_map.group), bool)
    pruned = axis_map.group >= 0
    keep[pruned] = [vectors[g][u] for g, u in zip(axis_map.group[pruned], axis_map.unit[pruned])]
    return keep


def masks_from_vectors(net, vectors):
    """The mask pytree (1.0 keep, 0.0 drop) of boolean keep vectors; only `params` are masked."""
    leaves = []
    for leaf, maps in enumerate(net.axis_maps):
        shape = net.shapes[leaf]
        if not net.is_param[leaf]:
            leaves.append(np.ones(shape, np.float32))
            continue
        mask = np.ones(shape, np.float32)
        for axis, axis_map in enumerate(maps):
            view = [1] * len(shape)
            view[axis] = shape[axis]
            mask = mask * _axis_keep(axis_map, vectors).reshape(view)
        leaves.append(mask)
    return jax.tree.unflatten(net.treedef, leaves)


def channel_masks(net, variables, keep, criterion="l2", calibration=None):
    """Masks that keep, per group, the channels chosen by `criterion` (lstsq selects by L2)."""
    return masks_from_vectors(net, keep_vectors(net, variables, keep, criterion, calibration))


def vectors_from_masks(net, masks):
    """Boolean keep vectors per group, read back from a channel mask pytree."""
    leaves = net.check_variables(masks)
    vectors = [np.zeros(s, bool) for s in net.group_sizes]
    for op in net.analysis.layers:
        m = net.axis_maps[op.leaf][op.out_axis]
        alive = np.moveaxis(np.asarray(leaves[op.leaf]) != 0, op.out_axis, 0)
        alive = alive.reshape(alive.shape[0], -1).any(axis=1)
        chosen = m.group >= 0
        for g, u, a in zip(m.group[chosen], m.unit[chosen], alive[chosen]):
            vectors[g][u] |= a
    for g, v in enumerate(vectors):
        if not v.any():
            raise MaskError(f"the masks remove every channel of group {g}; keep at least one")
    return vectors


def apply_masks(net, variables, masks):
    """Variables times masks (pure; jit-compatible)."""
    net.check_variables(variables)
    net.check_variables(masks)
    return jax.tree.map(lambda v, m: v * m.astype(v.dtype), variables, masks)


def weight_masks(net, variables, keep, importance=None):
    """Fine-grained masks: each layer keeps its most important weights (`keep`: ratio per layer; `importance`:
    per layer of `net.layers`, an array shaped like its kernel; by default the weights' magnitudes)."""
    leaves = net.check_variables(variables)
    ratios = keep if isinstance(keep, dict) else (
        {l.name: keep for l in net.layers} if isinstance(keep, Number) else dict(zip((l.name for l in net.layers), keep)))
    unknown = set(ratios) - {l.name for l in net.layers}
    if unknown:
        raise MaskError(f"no layer named {sorted(unknown)[0]!r}; layers are {[l.name for l in net.layers][:3]}...")
    masks = [jnp.ones(s, jnp.float32) for s in net.shapes]
    for index, (layer, op) in enumerate(zip(net.layers, net.analysis.layers)):
        if layer.name not in ratios:
            continue
        w = np.abs(np.asarray(leaves[op.leaf] if importance is None else importance[index])).ravel()
        count = ratio_count(float(ratios[layer.name]), w.size, f"layer {layer.name}")
        mask = (descending_ranks(w) < count).astype(np.float32)
        masks[op.leaf] = jnp.asarray(mask.reshape(net.shapes[op.leaf]))
    return jax.tree.unflatten(net.treedef, masks)
