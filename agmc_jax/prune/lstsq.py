"""AMC's least-squares reconstruction, for kxk convolutions and dense layers alike.

When a layer loses input channels, refit its weights on the kept inputs so that its outputs
match the unpruned network's at random positions of calibration feature maps: min ||A_k W - A W||
where A holds input patches of the original network.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.graph.ir import evaluate, flatten
from agmc_jax.prune.masks import _axis_keep, apply_masks, masks_from_vectors, top_channels

NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


@partial(jax.jit, static_argnames="ridge")
def refit(patches, weights, keep_rows, ridge=1e-3):
    """Weights (rows, out) refitted on the kept rows so that patches @ result ~ patches @ weights."""
    target = patches @ weights
    kept = patches * keep_rows
    gram = kept.T @ kept
    scale = ridge * (jnp.trace(gram) / gram.shape[0] + 1e-12)
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    solved = jnp.linalg.solve(gram + scale * eye + (1.0 - keep_rows)[:, None] * eye, kept.T @ target)
    return solved * keep_rows[:, None]


def _program_at_batch(net, batch):
    """The network's flat program traced for `batch` examples (same ops, same order)."""
    example = jax.ShapeDtypeStruct((batch, *net.example.shape[1:]), net.example.dtype)
    variables = jax.tree.unflatten(net.treedef, [jax.ShapeDtypeStruct(s, np.float32) for s in net.shapes])
    closed = jax.make_jaxpr(lambda v, x: net.module.apply(v, x, **net.call_kwargs))(variables, example)
    return flatten(closed)


def _conv_patches(op, x):
    """Input patches (N, H', W', C*kh*kw) of an NHWC conv op, channel-major as its kernel rows."""
    kernel_shape = op.params["rhs_shape"]
    return jax.lax.conv_general_dilated_patches(
        x, kernel_shape, op.params["window_strides"], op.params["padding"],
        lhs_dilation=op.params["lhs_dilation"], rhs_dilation=op.params["rhs_dilation"],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def reconstruct(net, variables, vectors, images, positions=10, seed=0):
    """Variables whose consuming layers are refitted for the channels kept by `vectors`."""
    leaves = list(net.check_variables(variables))
    program = _program_at_batch(net, images.shape[0])
    rng = np.random.default_rng(seed)
    candidates = []
    for layer in net.analysis.layers:
        op = program.ops[layer.op_index]
        keep_in = _axis_keep(net.axis_maps[layer.leaf][layer.in_axis], vectors)
        supported = layer.kind == "dense" or (
            layer.kind == "conv" and tuple(map(tuple, op.params["dimension_numbers"])) == NHWC_SPECS)
        if supported and not keep_in.all():
            candidates.append((layer, op, keep_in))
    if not candidates:
        return variables
    _, captured = evaluate(program, leaves + [jnp.asarray(images)], [op.inputs[0] for _, op, _ in candidates])
    for layer, op, keep_in in candidates:
        x = captured[op.inputs[0]]
        kernel = np.asarray(leaves[layer.leaf])
        if layer.kind == "dense":
            patches, weights, keep_rows = x.reshape(-1, x.shape[-1]), kernel, keep_in
        else:
            kh, kw, cin, cout = kernel.shape
            grid = _conv_patches(op._replace(params={**op.params, "rhs_shape": (kh, kw)}), x)
            flat = grid.reshape(-1, grid.shape[-1])
            take = rng.choice(flat.shape[0], size=min(flat.shape[0], positions * x.shape[0]), replace=False)
            patches = flat[take]
            weights = kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)
            keep_rows = np.repeat(keep_in, kh * kw)
        solved = np.asarray(refit(jnp.asarray(patches), jnp.asarray(weights), jnp.asarray(keep_rows, jnp.float32)))
        if layer.kind != "dense":
            solved = solved.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)
        leaves[layer.leaf] = jnp.asarray(solved, kernel.dtype)
    return jax.tree.unflatten(net.treedef, leaves)


def prune_counts(net, variables, counts, criterion="l2", calibration=None):
    """(masked variables, masks) keeping `counts[g]` channels per group, chosen by `criterion`.

    With `lstsq` the channels are chosen by L2 and the layers that lose inputs are refitted on the
    `calibration` images, as AMC does, so a search scores exactly the network it exports.
    """
    vectors = top_channels(net, variables, counts, criterion)
    masks = masks_from_vectors(net, vectors)
    if criterion == "lstsq":
        variables = reconstruct(net, variables, vectors, calibration)
    return apply_masks(net, variables, masks), masks
