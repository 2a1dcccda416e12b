"""The exact cost model of channel pruning as linear tables, evaluated with NumPy (float64) or jax.numpy.

Kept indices of every (leaf, axis) are `fixed + mult @ counts`; a layer's MACs scale with the kept
fractions of its input and output axes, a parameter leaf's size is the product of its kept axes.
The same tables serve the host (reports, exact checks) and compiled episodes (the action wall).
"""
from typing import NamedTuple

import numpy as np


class CostModel(NamedTuple):
    """Linear tables of a traced network's MACs and parameters as functions of per-group counts."""

    fixed: np.ndarray  # float64[A]: indices of each (leaf, axis) that no group prunes
    mult: np.ndarray  # float64[A, G]: fraction of group g's channels found on each (leaf, axis)
    axis_size: np.ndarray  # float64[A]
    layer_axes: np.ndarray  # int64[L, 2]: the (input, output) axis rows of each layer's kernel
    layer_macs: np.ndarray  # float64[L]
    param_axes: np.ndarray  # int64[P, D]: axis rows of each parameter leaf, padded with row A (size 1)


def cost_model(axis_maps, is_param, layer_ops, group_sizes) -> CostModel:
    """The tables for `axis_maps` (per leaf, per axis: group and unit of each index)."""
    n_groups = len(group_sizes)
    sizes = np.maximum(np.array(group_sizes, np.float64), 1)
    index, fixed, mult, axis_size = {}, [], [], []
    for leaf, maps in enumerate(axis_maps):
        for axis, m in enumerate(maps):
            index[leaf, axis] = len(fixed)
            fixed.append(np.sum(m.group < 0))
            mult.append(np.bincount(m.group[m.group >= 0], minlength=n_groups) / sizes)
            axis_size.append(len(m.group))
    rows = len(fixed)
    layer_axes = np.array([[index[op.leaf, op.in_axis], index[op.leaf, op.out_axis]] for op in layer_ops],
                          np.int64).reshape(-1, 2)
    params = [[index[leaf, a] for a in range(len(maps))] for leaf, maps in enumerate(axis_maps) if is_param[leaf]]
    width = max([len(p) for p in params] + [1])
    param_axes = np.array([p + [rows] * (width - len(p)) for p in params], np.int64).reshape(-1, width)
    return CostModel(np.array(fixed, np.float64), np.array(mult, np.float64).reshape(rows, n_groups),
                     np.array(axis_size, np.float64), layer_axes,
                     np.array([op.macs for op in layer_ops], np.float64), param_axes)


def kept_per_axis(model: CostModel, counts, xp=np):
    """Kept indices of every (leaf, axis) when group g keeps counts[g] channels."""
    dtype = xp.float64 if xp is np else xp.float32
    return xp.asarray(model.fixed, dtype) + xp.asarray(model.mult, dtype) @ xp.asarray(counts, dtype)


def evaluate_cost(model: CostModel, counts, xp=np):
    """(MACs per example, parameters) of the network keeping `counts`; `xp` is numpy (exact) or jax.numpy."""
    kept = kept_per_axis(model, counts, xp)
    fraction = kept / xp.maximum(xp.asarray(model.axis_size, kept.dtype), 1)
    macs = xp.sum(xp.asarray(model.layer_macs, kept.dtype) * xp.prod(fraction[model.layer_axes], axis=1))
    padded = xp.concatenate([kept, xp.ones(1, kept.dtype)])
    params = xp.sum(xp.prod(padded[model.param_axes], axis=1))
    return macs, params


def layer_macs(model: CostModel, counts):
    """MACs per layer for a policy of kept counts per group (NumPy)."""
    fraction = kept_per_axis(model, counts) / np.maximum(model.axis_size, 1)
    return model.layer_macs * np.prod(fraction[model.layer_axes], axis=1)
