"""The exact cost model of channel pruning as linear tables, evaluated with NumPy (float64) or jax.numpy.

Kept indices of every (leaf, axis) are `fixed + mult @ counts`; a layer's MACs are its MACs per
(input, output) index pair times the kept indices of both axes, a parameter leaf's size is the
product of its kept axes. Every table entry is an integer for the zoo's networks, so float32 sums
are exact up to 2^24 MACs or parameters and within float32 rounding (1e-7) beyond. The same tables
serve the host (float64: reports, exact checks) and compiled episodes (float32: the action wall).
"""
from typing import NamedTuple

import numpy as np


class CostModel(NamedTuple):
    """Linear tables of a traced network's MACs and parameters as functions of per-group counts."""

    fixed: np.ndarray  # float64[A]: indices of each (leaf, axis) that no group prunes
    mult: np.ndarray  # float64[A, G]: fraction of group g's channels found on each (leaf, axis)
    axis_size: np.ndarray  # float64[A]
    layer_axes: np.ndarray  # int64[L, 2]: the (input, output) axis rows of each layer's kernel
    pair_macs: np.ndarray  # float64[L]: MACs per kept (input index, output index) pair of each layer
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
    axis_size = np.array(axis_size, np.float64)
    pairs = np.maximum(axis_size[layer_axes[:, 0]] * axis_size[layer_axes[:, 1]], 1)
    return CostModel(np.array(fixed, np.float64), np.array(mult, np.float64).reshape(rows, n_groups), axis_size,
                     layer_axes, np.array([op.macs for op in layer_ops], np.float64) / pairs, param_axes)


def kept_per_axis(model: CostModel, counts, xp=np):
    """Kept indices of every (leaf, axis) when group g keeps counts[g] channels."""
    dtype = xp.float64 if xp is np else xp.float32
    return xp.asarray(model.fixed, dtype) + xp.asarray(model.mult, dtype) @ xp.asarray(counts, dtype)


def evaluate_cost(model: CostModel, counts, xp=np):
    """(MACs per example, parameters) of the network keeping `counts`; `xp` is numpy (exact) or jax.numpy."""
    kept = kept_per_axis(model, counts, xp)
    macs = xp.sum(xp.asarray(model.pair_macs, kept.dtype) * xp.prod(kept[model.layer_axes], axis=1))
    padded = xp.concatenate([kept, xp.ones(1, kept.dtype)])
    params = xp.sum(xp.prod(padded[model.param_axes], axis=1))
    return macs, params


def layer_macs(model: CostModel, counts):
    """MACs per layer for a policy of kept counts per group (NumPy)."""
    return model.pair_macs * np.prod(kept_per_axis(model, counts)[model.layer_axes], axis=1)
