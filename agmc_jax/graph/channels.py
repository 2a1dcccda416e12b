"""Channel analysis: which channel slots of a flat program must be pruned together.

Every axis of every parameter leaf gets fresh integer slots (one per index). Operations tie slots
(a union-find): element-wise ops tie their operands' axes, a convolution ties its input features
to its kernel's input axis (a depthwise one ties them to the output channels), a dense product
ties the contracted axes. Layout ops (broadcast, reshape, transpose, concatenate, slice) move
slots between axes. An operation the analysis does not understand freezes every slot it touches,
and so does the model's output: frozen slots are never pruned.
"""
from typing import NamedTuple

import numpy as np

from agmc_jax.graph.ir import Constant, Program

ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "rem", "max", "min", "pow", "integer_pow", "atan2",
    "exp", "exp2", "expm1", "log", "log1p", "sqrt", "rsqrt", "cbrt", "tanh", "logistic", "erf",
    "erfc", "erf_inv", "abs", "sign", "neg", "square", "sin", "cos", "floor", "ceil", "round",
    "convert_element_type", "copy", "copy_p", "stop_gradient", "reduce_precision", "clamp",
    "select_n", "ge", "gt", "le", "lt", "eq", "ne", "and", "or", "not", "xor", "is_finite",
    "nextafter", "real", "imag",
}
REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
              "argmax", "argmin"}
WINDOWED = {"reduce_window_max", "reduce_window_min", "reduce_window_sum"}
PARAM_PASSTHROUGH = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


class UnionFind:
    """Integer union-find that grows on demand; `frozen` marks classes that may not be pruned."""

    def __init__(self):
        self.parent = []
        self.frozen = {}

    def fresh(self, size: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + size))
        return np.arange(start, start + size)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: np.ndarray, b: np.ndarray):
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                if ry in self.frozen:
                    self.frozen.setdefault(rx, self.frozen.pop(ry))

    def freeze(self, slots: np.ndarray, reason: str):
        for x in slots.tolist():
            self.frozen.setdefault(self.find(x), reason)

    def roots(self, slots: np.ndarray) -> np.ndarray:
        return np.array([self.find(x) for x in slots.tolist()], dtype=np.int64)


class LayerOp(NamedTuple):
    """A convolution or dense product whose weights are a parameter leaf."""

    op_index: int
    kind: str  # conv | depthwise | grouped_conv | dense
    leaf: int  # index of the kernel among the flattened variables
    in_axis: int  # kernel axis that meets the input features
    out_axis: int  # kernel axis that makes the output features
    macs: int  # multiply-accumulates for one example
    where: str


class Analysis(NamedTuple):
    """Slots of every value's axes, the union-find over them, and the layers found."""

    axes: dict  # value id -> tuple (per axis) of slot arrays or None
    uf: UnionFind
    layers: tuple
    unknown: tuple  # (op index, primitive, where) the analysis could not reason about
    param_origin: dict  # value id -> parameter leaf it merely re-types


def analyse(program: Program, param_inputs, data_input: int) -> Analysis:
    """Propagate channel slots through `program` (inputs: parameter leaves and one data input)."""
    uf = UnionFind()
    axes, origin, layers, unknown = {}, {}, [], []
    activation = {data_input}

    for leaf, value in enumerate(param_inputs):
        axes[value] = tuple(uf.fresh(n) for n in program.shapes[value])
        origin[value] = leaf
    data_shape = program.shapes[data_input]
    input_slots = uf.fresh(data_shape[-1])
    uf.freeze(input_slots, "the network's input channels")
    axes[data_input] = (None,) * (len(data_shape) - 1) + (input_slots,)

    def slots_of(x):
        if isinstance(x, Constant):  # a closed-over array: its entries differ per index, so never prune through it
            return tuple(_frozen_fresh(uf, n, "a constant array along a channel axis") if n > 1 else None
                         for n in np.shape(x.value))
        return axes[x]

    def shape_of(x):
        return np.shape(x.value) if isinstance(x, Constant) else program.shapes[x]

    def tie(out_shape, operands):
        result = []
        for axis, size in enumerate(out_shape):
            found = [slots_of(x)[axis] for x in operands
                     if len(shape_of(x)) == len(out_shape) and shape_of(x)[axis] == size
                     and slots_of(x)[axis] is not None]
            for other in found[1:]:
                uf.union(found[0], other)
            result.append(found[0] if found else None)
        return tuple(result)

    def give_up(op, reason):
        unknown.append((op.index, op.name, op.where))
        message = f"operation {op.name} at {op.where or 'top level'} ({reason})"
        for x in op.inputs:
            for s in slots_of(x):
                if s is not None:
                    uf.freeze(s, message)
        out = []
        for value in op.outputs:
            fresh = tuple(uf.fresh(n) for n in program.shapes[value])
            for s in fresh:
                uf.freeze(s, message)
            out.append(fresh)
        return out

    for op in program.ops:
        ins = [x for x in op.inputs if not isinstance(x, Constant)]
        if any(x in activation for x in ins):
            activation.update(op.outputs)
        out_shape = program.shapes[op.outputs[0]]
        name = op.name
        try:
            if name in ELEMENTWISE:
                result = [tie(out_shape, op.inputs)]
                if name in PARAM_PASSTHROUGH and len(ins) == 1 and ins[0] in origin:
                    origin[op.outputs[0]] = origin[ins[0]]
            elif name == "broadcast_in_dim":
                result = [_broadcast(op, slots_of(op.inputs[0]), shape_of(op.inputs[0]), out_shape)]
            elif name == "reshape" and op.params.get("dimensions") is None:
                result = [_reshape(slots_of(op.inputs[0]), shape_of(op.inputs[0]), out_shape, uf)]
            elif name == "squeeze":
                dims = {d % len(shape_of(op.inputs[0])) for d in op.params["dimensions"]}
                result = [tuple(s for a, s in enumerate(slots_of(op.inputs[0])) if a not in dims)]
            elif name == "transpose":
                source = slots_of(op.inputs[0])
                result = [tuple(source[a] for a in op.params["permutation"])]
            elif name in REDUCTIONS:
                result = [_reduce(op, slots_of(op.inputs[0]), uf)]
            elif name in WINDOWED:
                result = [_window(op, slots_of(op.inputs[0]), shape_of(op.inputs[0]), out_shape, uf)]
            elif name == "concatenate":
                result = [_concatenate(op, [slots_of(x) for x in op.inputs],
                                       [shape_of(x) for x in op.inputs], out_shape, uf)]
            elif name == "slice":
                result = [_slice(op, slots_of(op.inputs[0]))]
            elif name == "pad":
                result = [_pad(op, slots_of(op.inputs[0]), uf)]
            elif name == "conv_general_dilated":
                result = [_conv(op, program, slots_of, origin, layers, uf)]
            elif name == "dot_general":
                result = [_dot(op, program, slots_of, origin, layers, uf)]
            else:
                raise _Unsupported("not understood by the channel analysis")
        except _Unsupported as why:
            result = give_up(op, str(why))
        for value, value_axes in zip(op.outputs, result):
            axes[value] = value_axes

    for x in program.outputs:
        for s in slots_of(x):
            if s is not None:
                uf.freeze(s, "the network's output")
    return Analysis(axes, uf, tuple(layers), tuple(unknown), origin)


def _frozen_fresh(uf, size, reason):
    slots = uf.fresh(size)
    uf.freeze(slots, reason)
    return slots


class _Unsupported(Exception):
    """Raised inside a rule when an op's use of channels cannot be followed."""


def _broadcast(op, source, in_shape, out_shape):
    result = [None] * len(out_shape)
    for axis, out_axis in enumerate(op.params["broadcast_dimensions"]):
        if in_shape[axis] == out_shape[out_axis]:
            result[out_axis] = source[axis]
    return tuple(result)


def _reshape_groups(in_shape, out_shape):
    """Pairs (input axes, output axes) whose sizes multiply to the same number; size-1 axes apart."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        ins, outs = [i], [j]
        a, b = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= in_shape[i]
                ins.append(i)
                i += 1
            else:
                b *= out_shape[j]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    return groups


def _reshape(source, in_shape, out_shape, uf):
    result = [None] * len(out_shape)
    for ins, outs in _reshape_groups(in_shape, out_shape):
        tracked = [a for a in ins if source[a] is not None]
        if not tracked:
            continue
        if not outs:
            for a in tracked:
                uf.freeze(source[a], "a size-1 channel axis removed by reshape")
            continue
        if len(tracked) > 1:
            raise _Unsupported("reshape merges two channel axes")
        sizes = [in_shape[a] for a in ins]
        view = [1] * len(ins)
        view[ins.index(tracked[0])] = sizes[ins.index(tracked[0])]
        flat = np.broadcast_to(source[tracked[0]].reshape(view), sizes).reshape(-1)
        split = flat.reshape([out_shape[b] for b in outs])
        varying = [k for k in range(split.ndim) if not np.all(split == np.take(split, [0], axis=k))]
        if len(varying) > 1:
            raise _Unsupported("reshape splits a channel axis")
        if varying:
            k = varying[0]
            index = [0] * split.ndim
            index[k] = slice(None)
            result[outs[k]] = split[tuple(index)]
        else:
            result[outs[-1]] = np.broadcast_to(flat[:1], (out_shape[outs[-1]],)).copy()
    return tuple(result)


def _reduce(op, source, uf):
    reduced = set(op.params["axes"])
    for a in reduced:
        if source[a] is not None:
            uf.freeze(source[a], f"channels mixed by {op.name} at {op.where}")
    return tuple(s for a, s in enumerate(source) if a not in reduced)


def _window(op, source, in_shape, out_shape, uf):
    result = []
    for a, s in enumerate(source):
        window = op.params["window_dimensions"][a]
        if s is not None and window != 1:
            uf.freeze(s, f"channels mixed by {op.name} at {op.where}")
        result.append(s if in_shape[a] == out_shape[a] and window == 1 else None)
    return tuple(result)


def _concatenate(op, sources, shapes, out_shape, uf):
    dim = op.params["dimension"]
    pieces = []
    for slots, shape in zip(sources, shapes):
        if slots[dim] is None:
            fresh = uf.fresh(shape[dim])
            uf.freeze(fresh, f"a constant concatenated at {op.where}")
            pieces.append(fresh)
        else:
            pieces.append(slots[dim])
    result = []
    for axis, size in enumerate(out_shape):
        if axis == dim:
            result.append(np.concatenate(pieces))
            continue
        found = [s[axis] for s in sources if s[axis] is not None]
        for other in found[1:]:
            uf.union(found[0], other)
        result.append(found[0] if found else None)
    return tuple(result)


def _slice(op, source):
    starts, limits = op.params["start_indices"], op.params["limit_indices"]
    strides = op.params["strides"] or (1,) * len(starts)
    return tuple(None if s is None else s[b:e:k] for s, b, e, k in zip(source, starts, limits, strides))


def _pad(op, source, uf):
    result = []
    for s, (low, high, interior) in zip(source, op.params["padding_config"]):
        if s is not None and (low, high, interior) != (0, 0, 0):
            raise _Unsupported("pads a channel axis")
        result.append(s)
    return tuple(result)


def _kernel_leaf(x, origin):
    return None if isinstance(x, Constant) else origin.get(x)


def _conv(op, program, slots_of, origin, layers, uf):
    lhs, rhs = op.inputs
    dims = op.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dims.lhs_spec, dims.rhs_spec, dims.out_spec
    if op.params["batch_group_count"] != 1:
        raise _Unsupported("batch-grouped convolution")
    lhs_slots, rhs_slots = slots_of(lhs), slots_of(rhs)
    lhs_shape, rhs_shape = program.shapes[lhs], program.shapes[rhs]
    out_shape = program.shapes[op.outputs[0]]
    groups = op.params["feature_group_count"]
    c_in, c_out = lhs_shape[lhs_spec[1]], rhs_shape[rhs_spec[0]]
    feature_in, kernel_in, kernel_out = lhs_slots[lhs_spec[1]], rhs_slots[rhs_spec[1]], rhs_slots[rhs_spec[0]]
    if groups == 1:
        kind = "conv"
        if feature_in is not None and kernel_in is not None:
            uf.union(feature_in, kernel_in)
    elif groups == c_in:
        kind = "depthwise"
        if feature_in is not None and kernel_out is not None:
            uf.union(feature_in[np.arange(c_out) // (c_out // c_in)], kernel_out)
    else:
        kind = "grouped_conv"
        reason = f"grouped convolution ({groups} groups) at {op.where}: its channels are not pruned"
        for s in (feature_in, kernel_in, kernel_out):
            if s is not None:
                uf.freeze(s, reason)
    leaf = _kernel_leaf(rhs, origin)
    spatial = int(np.prod([out_shape[a] for a in out_spec[2:]]))
    window = int(np.prod([rhs_shape[a] for a in rhs_spec[2:]]))
    if leaf is not None:
        macs = spatial * window * rhs_shape[rhs_spec[1]] * c_out * out_shape[out_spec[0]]
        layers.append(LayerOp(op.index, kind, leaf, rhs_spec[1], rhs_spec[0], macs, op.where))
    result = [None] * len(out_shape)
    result[out_spec[1]] = kernel_out
    return tuple(result)


def _dot(op, program, slots_of, origin, layers, uf):
    lhs, rhs = op.inputs
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = op.params["dimension_numbers"]
    lhs_slots, rhs_slots = slots_of(lhs), slots_of(rhs)
    for a, b in list(zip(lhs_contract, rhs_contract)) + list(zip(lhs_batch, rhs_batch)):
        if lhs_slots[a] is not None and rhs_slots[b] is not None:
            uf.union(lhs_slots[a], rhs_slots[b])
    lhs_free = [a for a in range(len(lhs_slots)) if a not in lhs_contract and a not in lhs_batch]
    rhs_free = [b for b in range(len(rhs_slots)) if b not in rhs_contract and b not in rhs_batch]
    batch = [lhs_slots[a] if lhs_slots[a] is not None else rhs_slots[b] for a, b in zip(lhs_batch, rhs_batch)]
    result = tuple(batch + [lhs_slots[a] for a in lhs_free] + [rhs_slots[b] for b in rhs_free])
    leaf = _kernel_leaf(rhs, origin)
    if leaf is not None and len(rhs_contract) == 1 and len(rhs_free) == 1 and not rhs_batch:
        contracted = program.shapes[rhs][rhs_contract[0]]
        macs = int(np.prod(program.shapes[op.outputs[0]])) * contracted
        layers.append(LayerOp(op.index, "dense", leaf, rhs_contract[0], rhs_free[0], macs, op.where))
    return result
