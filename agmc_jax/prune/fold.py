"""BatchNorm folded into the convolution (or dense layer) before it, for inference, on any traced Linen module.

At inference a BatchNorm is the per-channel affine map (y - mean) * scale / sqrt(var + eps) + bias. When its input
is a convolution's output (after that convolution's own bias, if any) and nothing else reads that output, the map
moves into the convolution: kernel * s and (bias - mean) * s + beta, with s = scale / sqrt(var + eps). The pairs
come from the traced program (a `Network`): the convolution's output value must have one reader, BatchNorm's
`x - mean`. A BatchNorm after a residual add, or whose input feeds something else too, stays as it is.
`Folded` runs the module with the folded BatchNorms as identities and their convolutions with a bias; like
`Slimmed`, it takes layer widths from the stored kernels, so it folds dense and slimmed networks alike.
"""
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from agmc_jax.prune.slim import Slimmed, intercepted, reissue

_BROADCASTS = ("broadcast_in_dim", "reshape", "convert_element_type")  # ops that only re-type a parameter


def _folded_call(next_fun, args, kwargs, context, convs, norms):
    module = context.module
    if not intercepted(context):
        return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and module.scope.path in norms:
        return args[0]
    if isinstance(module, (nn.Conv, nn.Dense)):
        return reissue(module, args, kwargs, **({"use_bias": True} if module.scope.path in convs else {}))
    return next_fun(*args, **kwargs)


class Folded(nn.Module):
    """`base` with the BatchNorms at `norms` (scope paths) as identities and the layers at `convs` given a bias;
    widths come from the variables it is applied to, as in `Slimmed`."""

    base: Any
    convs: tuple = ()
    norms: tuple = ()

    def setup(self):
        nn.share_scope(self, self.base)

    def __call__(self, *args, **kwargs):
        def call(next_fun, args, kwargs, context):
            return _folded_call(next_fun, args, kwargs, context, self.convs, self.norms)

        with nn.intercept_methods(call):
            return self.base(*args, **kwargs)


def _modules(net):
    """{scope path: module} of every module called when `net`'s module is applied to its example."""
    found = {}

    def record(next_fun, args, kwargs, context):
        if intercepted(context):
            found.setdefault(context.module.scope.path, context.module)
        return next_fun(*args, **kwargs)

    abstract = jax.tree.unflatten(net.treedef, [jax.ShapeDtypeStruct(s, np.float32) for s in net.shapes])
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: net.module.apply(v, x, **net.call_kwargs), abstract, net.example)
    return found


def fold_pairs(net):
    """((layer scope path, BatchNorm scope path, its epsilon), ...): every convolution or dense layer whose output
    only a BatchNorm over its channels reads (after the layer's own bias, if any), as found in the traced program."""
    program, paths = net.program, net.paths
    readers, made_by = {}, {}
    for op in program.ops:
        for x in op.inputs:
            if isinstance(x, int):
                readers.setdefault(x, []).append(op)
        made_by.update({out: op for out in op.outputs})
    leaf_of = {value: leaf for leaf, value in enumerate(program.inputs[:-1])}

    def origin(x):
        """The variable path a value merely re-types, or None."""
        while isinstance(x, int) and x not in leaf_of and x in made_by and made_by[x].name in _BROADCASTS:
            x = made_by[x].inputs[0]
        return paths[leaf_of[x]] if isinstance(x, int) and x in leaf_of else None

    def only_reader(x):
        ops = readers.get(x, [])
        return ops[0] if len(ops) == 1 and x not in program.outputs else None

    modules = _modules(net)
    kernels = [layer.kernel_path for layer in net.layers]
    pairs = []
    for layer, layer_op in zip(net.layers, net.analysis.layers):
        prefix = layer.kernel_path[1:-1]
        if (kernels.count(layer.kernel_path) > 1 or layer_op.out_axis != len(net.shapes[layer_op.leaf]) - 1
                or not isinstance(modules.get(prefix), (nn.Conv, nn.Dense))):
            continue
        y = program.ops[layer.op_index].outputs[0]
        bias = only_reader(y)
        if (bias is not None and bias.name == "add" and bias.inputs[0] == y
                and origin(bias.inputs[1]) == ("params", *prefix, "bias")):
            y = bias.outputs[0]
        reader = only_reader(y)
        if reader is None or reader.name != "sub" or reader.inputs[0] != y:
            continue
        mean = origin(reader.inputs[1])
        if mean is None or mean[0] != "batch_stats" or mean[-1] != "mean":
            continue
        norm = modules.get(tuple(mean[1:-1]))
        if isinstance(norm, nn.BatchNorm) and norm.axis in (-1, len(program.shapes[y]) - 1):
            pairs.append((prefix, tuple(mean[1:-1]), float(norm.epsilon)))
    return tuple(pairs)


def fold_variables(variables, pairs):
    """`variables` with each pair's BatchNorm moved into its layer's kernel and bias (float64 arithmetic)."""
    flat = dict(traverse_util.flatten_dict(variables))
    for conv, norm, epsilon in pairs:
        mean = np.asarray(flat.pop(("batch_stats", *norm, "mean")), np.float64)
        var = np.asarray(flat.pop(("batch_stats", *norm, "var")), np.float64)
        scale = np.asarray(flat.pop(("params", *norm, "scale"), 1.0), np.float64)  # absent: use_scale=False
        shift = np.asarray(flat.pop(("params", *norm, "bias"), 0.0), np.float64)
        factor = scale / np.sqrt(var + epsilon)
        kernel = flat[("params", *conv, "kernel")]
        bias = np.asarray(flat.get(("params", *conv, "bias"), 0.0), np.float64)
        flat[("params", *conv, "kernel")] = (np.asarray(kernel, np.float64) * factor).astype(kernel.dtype)
        flat[("params", *conv, "bias")] = ((bias - mean) * factor + shift).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def fold_batchnorm(net, variables):
    """(Folded module, variables) computing what `net.module.apply(variables, x, **net.call_kwargs)` does at
    inference, with every foldable BatchNorm (see `fold_pairs`) inside its layer. `net` is the trace of the module
    (dense or `Slimmed`) with variables shaped like `variables`."""
    net.check_variables(variables)
    pairs = fold_pairs(net)
    base = net.module.base if isinstance(net.module, Slimmed) else net.module
    return Folded(base, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)), fold_variables(variables, pairs)
