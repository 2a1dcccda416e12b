"""Channel groups: the channel analysis's prunable classes numbered as groups, and keep policies per group.

A group is the set of channels that must be removed together; every axis of every variable leaf
maps each of its indices to a (group, unit) pair, or to group -1 when it is not prunable.
"""
import warnings
from collections import Counter, defaultdict
from numbers import Number

import numpy as np

from agmc_jax.errors import MaskError


class AxisMap:
    """For one axis of one variable leaf: each index's group (-1 = fixed) and unit within the group."""

    def __init__(self, group: np.ndarray, unit: np.ndarray):
        self.group, self.unit = group, unit


def build_groups(analysis, program, paths, layer_ops):
    """Channel groups and, for every axis of every leaf, which group/unit each index belongs to."""
    uf = analysis.uf
    n_leaves = len(paths)
    roots = [tuple(None if s is None else uf.roots(s) for s in analysis.axes[program.inputs[leaf]])
             for leaf in range(n_leaves)]
    occurrences = defaultdict(Counter)
    for leaf in range(n_leaves):
        for axis, r in enumerate(roots[leaf]):
            for root in r.tolist():
                occurrences[root][(leaf, axis)] += 1
    produced = {}
    for order, layer in enumerate(layer_ops):
        for position, root in enumerate(roots[layer.leaf][layer.out_axis].tolist()):
            produced.setdefault(root, (order, position))
    by_signature = defaultdict(list)
    for root, (order, position) in produced.items():
        if root in uf.frozen:
            continue
        signature = tuple(sorted(occurrences[root].items()))
        by_signature[signature].append((order, position, root))
    members = sorted(sorted(units) for units in by_signature.values())
    unit_of = {}
    for g, units in enumerate(members):
        for u, (_, _, root) in enumerate(units):
            unit_of[root] = (g, u)
    axis_maps = []
    for leaf in range(n_leaves):
        maps = []
        for r in roots[leaf]:
            pairs = np.array([unit_of.get(root, (-1, -1)) for root in r.tolist()], dtype=np.int64)
            pairs = pairs.reshape(-1, 2)
            maps.append(AxisMap(pairs[:, 0], pairs[:, 1]))
        axis_maps.append(tuple(maps))
    sizes = [len(units) for units in members]
    return sizes, axis_maps, {root: g for root, (g, _) in unit_of.items()}


def frozen_reasons(analysis, layer_ops, program):
    """One line per layer whose output channels cannot be pruned because of an unknown op."""
    uf = analysis.uf
    lines = []
    for layer in layer_ops:
        slots = analysis.axes[program.inputs[layer.leaf]][layer.out_axis]
        reasons = {uf.frozen[r] for r in uf.roots(slots).tolist() if r in uf.frozen}
        reasons -= {"the network's output"}
        lines.extend(f"{layer.where}: output channels not prunable: {why}"
                     for why in sorted(reasons) if why.startswith("operation") or "grouped" in why)
    for line in lines:
        warnings.warn(line, stacklevel=3)
    return tuple(lines)


def ratio_count(ratio, size, what):
    """How many of `size` items a keep ratio in (0, 1] keeps (at least one); `what` names them in errors."""
    if not 0 < ratio <= 1:
        raise MaskError(f"keep ratio of {what} must be in (0, 1], got {ratio}")
    return max(1, int(round(ratio * size)))


def is_ratio(keep) -> bool:
    """Whether a keep policy is one ratio for every group (a number or a 0-d array)."""
    return isinstance(keep, Number) or getattr(keep, "ndim", None) == 0


def per_group(keep) -> dict:
    """A keep policy's entries by group index ({} when it is one ratio for every group)."""
    if is_ratio(keep):
        return {}
    return dict(keep) if isinstance(keep, dict) else dict(enumerate(keep))


def keep_counts(sizes, keep) -> np.ndarray:
    """Channels kept per group of `sizes` from a ratio, per-group ratios/counts, boolean vectors or a dict."""
    if is_ratio(keep):
        return np.array([ratio_count(float(keep), s, f"group {g}") for g, s in enumerate(sizes)])
    items = per_group(keep)
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
            counts[g] = ratio_count(float(value), sizes[g], f"group {g}")
    return counts
