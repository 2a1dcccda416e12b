"""AMC's least-squares reconstruction, for kxk convolutions and dense layers alike.

When a layer loses input channels, refit its weights on the kept inputs so that its outputs
match the unpruned network's at random positions of calibration feature maps: min ||A_k W - A W||
where A holds input patches of the original network. A^T A and A^T A W do not depend on the
policy, so a search computes them once, summed over batches of images, and each policy only solves
its kept rows (traceable). A dense layer gets one row of A per image: with fewer images than inputs
its fit is underdetermined (LeNet-5, whose dense layers read 400 and 120 inputs, refitted on 100
images ended 2.4 points below magnitude pruning after the same fine-tune, and 0.3 above on 1,000),
hence `REFIT_IMAGES`, and a ridge that pulls towards the original weights rather than towards zero,
so that what the images do not determine keeps its trained value.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.graph.ir import evaluate, flatten
from agmc_jax.prune.masks import _axis_keep, apply_masks, masks_from_vectors, top_channels, vectors_from_masks

NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
RIDGE = 1e-3  # as a fraction of the kept Gram matrix's mean diagonal
REFIT_IMAGES = 1000  # images a refit is fitted on when the caller does not choose: more than a dense layer's inputs
REFIT_BATCH = 250  # images per forward pass while the systems are summed
PATCH_FLOATS = 2 ** 24  # at most this many patch values extracted at once (64 MB), whatever the image size


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


def reconstruct(net, variables, masks, images, positions=10, seed=0):
    """Variables whose layers that lost input channels under `masks` are refitted by least squares on `images`.

    Each kxk convolution is fitted at `positions` random positions per image (drawn with `seed`).
    """
    return reconstruct_vectors(net, variables, vectors_from_masks(net, masks), images, positions, seed)


def refit_layers(net) -> tuple:
    """The layers a refit can change: dense layers and NHWC convolutions whose input channels can be pruned."""
    chosen = []
    for layer in net.analysis.layers:
        op = net.program.ops[layer.op_index]
        supported = layer.kind == "dense" or (
            layer.kind == "conv" and tuple(map(tuple, op.params["dimension_numbers"])) == NHWC_SPECS)
        if supported and (net.axis_maps[layer.leaf][layer.in_axis].group >= 0).any():
            chosen.append(layer)
    return tuple(chosen)


def refit_systems(net, variables, images, layers, positions=10, seed=0, batch=REFIT_BATCH) -> tuple:
    """Per layer of `layers`: (A^T A, A^T A W) for A its inputs in the original network on `images` (at
    `positions` random positions per image for convolutions), summed over batches of `batch` images. They do
    not depend on the policy."""
    if not layers:
        return ()
    leaves = list(net.check_variables(variables))
    rng = np.random.default_rng(seed)
    weights = [_kernel_rows(np.asarray(leaves[layer.leaf], np.float32)) for layer in layers]
    grams, counts, programs = [0.0] * len(layers), [0] * len(layers), {}
    for start in range(0, images.shape[0], batch):
        chunk = jnp.asarray(images[start:start + batch])
        if chunk.shape[0] not in programs:  # traced once per batch size (setdefault would trace every batch)
            programs[chunk.shape[0]] = _program_at_batch(net, chunk.shape[0])
        program = programs[chunk.shape[0]]
        ops = [program.ops[layer.op_index] for layer in layers]
        _, captured = evaluate(program, leaves + [chunk], [op.inputs[0] for op in ops])
        for index, (layer, op) in enumerate(zip(layers, ops)):
            kernel_size = leaves[layer.leaf].shape[:2]
            patches = jnp.asarray(_sampled_rows(layer, op, np.asarray(captured[op.inputs[0]]), kernel_size,
                                                positions, rng))
            grams[index] = grams[index] + np.asarray(patches.T @ patches, np.float64)  # batch on device, sum on host
            counts[index] += patches.shape[0]
    for layer, count, w in zip(layers, counts, weights):
        if count < w.shape[0]:
            name = "/".join(str(key) for key in net.paths[layer.leaf][1:-1])
            warnings.warn(f"the least-squares refit of {name} fits {w.shape[0]} inputs on {count} samples "
                          f"({images.shape[0]} images): underdetermined, it keeps the trained weights where the "
                          "images say nothing; give more images (--reward-images) for a full refit", stacklevel=2)
    return tuple((jnp.asarray(gram), jnp.asarray(gram @ w)) for gram, w in zip(grams, weights))


def _kernel_rows(kernel):
    """A dense kernel as it is; a kxk convolution's as (C*kh*kw, out), channel-major as its patches."""
    if kernel.ndim == 2:
        return kernel
    kh, kw, cin, cout = kernel.shape
    return kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)


def _sampled_rows(layer, op, x, kernel_size, positions, rng):
    """The rows of A one batch of the layer's inputs `x` adds: every image for a dense layer, `positions`
    random patches of each image for a convolution, extracted a few images at a time so that large images fit."""
    if layer.kind == "dense":
        return x.reshape(-1, x.shape[-1])
    op = op._replace(params={**op.params, "rhs_shape": tuple(kernel_size)})
    step = max(1, PATCH_FLOATS // int(np.prod(x.shape[1:3]) * x.shape[3] * np.prod(kernel_size)))
    rows = []
    for start in range(0, x.shape[0], step):
        grid = np.asarray(_conv_patches(op, x[start:start + step]))
        flat = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        chosen = np.stack([rng.choice(flat.shape[1], min(flat.shape[1], positions), replace=False) for _ in flat])
        rows.append(np.take_along_axis(flat, chosen[:, :, None], axis=1).reshape(-1, flat.shape[-1]))
    return np.concatenate(rows)


def refit_kernel(kernel, system, keep_in, ridge=RIDGE):
    """`kernel` refitted on its kept inputs `keep_in`: min ||A_k W' - A W||^2 + r ||W' - W_k||^2, the ridge r
    (`ridge` times the kept Gram matrix's mean diagonal) pulling towards the kept original weights W_k;
    unchanged when every input is kept (pure, traceable: `keep_in` may be a tracer)."""
    gram, rhs = system
    rows = gram.shape[0]
    keep = jnp.repeat(jnp.asarray(keep_in), rows // keep_in.shape[0], total_repeat_length=rows).astype(gram.dtype)
    kept = gram * keep[:, None] * keep[None, :]
    scale = ridge * (jnp.sum(jnp.diag(kept)) / rows + 1e-12)
    eye = jnp.eye(rows, dtype=gram.dtype)
    original = _kernel_rows(kernel).astype(gram.dtype)
    solved = jnp.linalg.solve(kept + scale * eye + (1.0 - keep)[:, None] * eye,
                              keep[:, None] * (rhs + scale * original)) * keep[:, None]
    if kernel.ndim == 4:
        kh, kw, cin, cout = kernel.shape
        solved = solved.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)
    return jnp.where(jnp.all(keep_in), kernel, solved.astype(kernel.dtype))


def reconstruct_vectors(net, variables, vectors, images, positions=10, seed=0):
    """`reconstruct` for the channels kept by boolean keep vectors per group (what a search step holds)."""
    leaves = list(net.check_variables(variables))
    layers = refit_layers(net)
    for layer, system in zip(layers, refit_systems(net, variables, images, layers, positions, seed)):
        keep_in = _axis_keep(net.axis_maps[layer.leaf][layer.in_axis], vectors)
        leaves[layer.leaf] = np.asarray(refit_kernel(jnp.asarray(leaves[layer.leaf]), system, keep_in))
    return jax.tree.unflatten(net.treedef, leaves)


def prune_counts(net, variables, counts, criterion="l2", calibration=None):
    """(masked variables, masks) keeping `counts[g]` channels per group, chosen by `criterion`.

    With `lstsq` the channels are chosen by L2 and the layers that lose inputs are refitted on the
    `calibration` images, as AMC does, so a search scores exactly the network it exports.
    """
    vectors = top_channels(net, variables, counts, criterion, calibration)
    masks = masks_from_vectors(net, vectors)
    if criterion == "lstsq":
        variables = reconstruct_vectors(net, variables, vectors, calibration)
    return apply_masks(net, variables, masks), masks
