"""Mask pytrees: which channels (or weights) a pruned network keeps, and applying them."""
from numbers import Number

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.errors import MaskError

CRITERIA = ("l1", "l2", "lstsq")


def _ratio_count(ratio, size, what):
    if not 0 < ratio <= 1:
        raise MaskError(f"keep ratio of {what} must be in (0, 1], got {ratio}")
    return max(1, int(round(ratio * size)))


def _scalar(keep) -> bool:
    return isinstance(keep, Number) or getattr(keep, "ndim", None) == 0


def keep_counts(net, keep) -> np.ndarray:
    """Channels kept per group from a ratio, per-group ratios/counts, boolean vectors or a dict."""
    sizes = net.group_sizes
    if _scalar(keep):
        keep = float(keep)
        return np.array([_ratio_count(float(keep), s, f"group {g}") for g, s in enumerate(sizes)])
    items = dict(keep) if isinstance(keep, dict) else dict(enumerate(keep))
    if set(items) - set(range(len(sizes))) or (not isinstance(keep, dict) and len(items) != len(sizes)):
        raise MaskError(f"the network has {len(sizes)} channel groups; keep gives {sorted(items)}")
    counts = np.array(sizes)
    for g, value in items.items():
        value = np.asarray(value)
        if value.dtype == bool:
            if value.shape != (sizes[g],) or not value.any():
                raise MaskError(f"keep vector of group {g} must be {sizes[g]} booleans with one True")
            counts[g] = int(value.sum())
        elif np.issubdtype(value.dtype, np.integer) and value.ndim == 0 and value > 1:
            if value > sizes[g]:
                raise MaskError(f"group {g} has {sizes[g]} channels; cannot keep {int(value)}")
            counts[g] = int(value)
        else:
            counts[g] = _ratio_count(float(value), sizes[g], f"group {g}")
    return counts


def channel_importance(net, variables, criterion="l2"):
    """Per group, one score per channel: the norm of the weights that produce it."""
    if criterion not in CRITERIA:
        raise MaskError(f"unknown criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    leaves = net.check_variables(variables)
    scores = [np.zeros(s) for s in net.group_sizes]
    power = 1 if criterion == "l1" else 2
    for op in net.analysis.layers:
        m = net.axis_maps[op.leaf][op.out_axis]
        w = np.moveaxis(np.abs(np.asarray(leaves[op.leaf], np.float64)) ** power, op.out_axis, 0)
        per_index = w.reshape(w.shape[0], -1).sum(axis=1)
        for g in np.unique(m.group[m.group >= 0]):
            chosen = m.group == g
            np.add.at(scores[g], m.unit[chosen], per_index[chosen])
    return [s if power == 1 else np.sqrt(s) for s in scores]


def descending_ranks(values):
    """Each entry's rank by value, largest first (ties broken by position): `rank < k` keeps the top k."""
    return np.argsort(np.argsort(-values, kind="stable"), kind="stable")


def channel_ranks(net, variables, criterion="l2"):
    """Per group, each channel's rank by importance (0 = most important, ties broken by index)."""
    return [descending_ranks(score) for score in channel_importance(net, variables, criterion)]


def top_channels(net, variables, counts, criterion="l2"):
    """Boolean keep vector per group holding its `counts[g]` highest-scoring channels."""
    return [rank < int(count) for count, rank in zip(counts, channel_ranks(net, variables, criterion))]


def keep_vectors(net, variables, keep, criterion="l2"):
    """Boolean keep vector per group: given vectors as they are, else the top-scoring channels."""
    vectors = top_channels(net, variables, keep_counts(net, keep), criterion)
    given = dict(keep) if isinstance(keep, dict) else (dict(enumerate(keep)) if not _scalar(keep) else {})
    for g, value in given.items():
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


def channel_masks(net, variables, keep, criterion="l2"):
    """Masks that keep, per group, the channels chosen by `criterion` (lstsq selects by L2)."""
    return masks_from_vectors(net, keep_vectors(net, variables, keep, "l2" if criterion == "lstsq" else criterion))


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


def weight_masks(net, variables, keep):
    """Fine-grained masks: each layer keeps its largest-magnitude weights (`keep`: ratio per layer)."""
    leaves = net.check_variables(variables)
    ratios = keep if isinstance(keep, dict) else (
        {l.name: keep for l in net.layers} if isinstance(keep, Number) else dict(zip((l.name for l in net.layers), keep)))
    unknown = set(ratios) - {l.name for l in net.layers}
    if unknown:
        raise MaskError(f"no layer named {sorted(unknown)[0]!r}; layers are {[l.name for l in net.layers][:3]}...")
    masks = [jnp.ones(s, jnp.float32) for s in net.shapes]
    for layer, op in zip(net.layers, net.analysis.layers):
        if layer.name not in ratios:
            continue
        w = np.abs(np.asarray(leaves[op.leaf])).ravel()
        count = _ratio_count(float(ratios[layer.name]), w.size, f"layer {layer.name}")
        mask = (descending_ranks(w) < count).astype(np.float32)
        masks[op.leaf] = jnp.asarray(mask.reshape(net.shapes[op.leaf]))
    return jax.tree.unflatten(net.treedef, masks)
