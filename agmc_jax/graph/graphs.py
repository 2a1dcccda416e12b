"""The computational graph of a traced network as a jraph `GraphsTuple`, the state AGMC embeds.

Nodes are the data input (node 0) and, in program order, every op that consumes an activation
(a value that depends on the data input); ops on parameters alone (BatchNorm's `rsqrt(var + eps)`)
are folded away. Each activation operand of a node gives one edge from its producer.

Node features (float32, `NUM_FEATURES` wide for every network, so graphs of different networks
batch): a one-hot op type over `OP_TYPES`, then the numeric features `NUMERIC` scaled as
`log1p(x) / log1p(SCALES[name])` (about [0, 1] for networks up to ImageNet size) and a 0/1
prunable flag. Edge features: a one-hot of the operand position (0, 1, 2 or later).
"""
import jraph
import numpy as np

from agmc_jax.errors import InputShapeError
from agmc_jax.graph.ir import Constant

OP_TYPES = ("input", "conv", "depthwise", "grouped_conv", "dense", "add", "mul", "arithmetic",
            "activation", "pooling", "reduction", "concatenate", "layout", "other")
NUMERIC = ("kernel_h", "kernel_w", "stride", "groups", "in_channels", "out_channels",
           "out_h", "out_w", "macs", "params")
SCALES = {"kernel_h": 16, "kernel_w": 16, "stride": 8, "groups": 4096, "in_channels": 4096,
          "out_channels": 4096, "out_h": 1024, "out_w": 1024, "macs": 1e11, "params": 1e9}
FEATURES = tuple(f"type_{t}" for t in OP_TYPES) + NUMERIC + ("prunable",)
NUM_FEATURES = len(FEATURES)
NUM_EDGE_FEATURES = 3

_PRIMITIVE_TYPES = {
    "add": ("add", "add_any"),
    "mul": ("mul",),
    "arithmetic": ("sub", "div", "rem", "pow", "integer_pow", "neg", "sqrt", "rsqrt", "cbrt",
                   "square", "log", "log1p", "abs", "sign", "floor", "ceil", "round",
                   "convert_element_type", "reduce_precision"),
    "activation": ("max", "min", "clamp", "logistic", "tanh", "exp", "exp2", "expm1", "erf",
                   "erfc", "select_n"),
    "pooling": ("reduce_window_max", "reduce_window_min", "reduce_window_sum", "reduce_window"),
    "reduction": ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                  "reduce_or", "argmax", "argmin"),
    "concatenate": ("concatenate",),
    "layout": ("reshape", "transpose", "broadcast_in_dim", "slice", "squeeze", "pad",
               "expand_dims", "rev", "copy", "copy_p", "dynamic_slice"),
}
_TYPE_OF = {p: t for t, primitives in _PRIMITIVE_TYPES.items() for p in primitives}


def scale(value, name: str):
    """The normalised value of numeric feature `name` (log1p over log1p of its scale)."""
    return np.log1p(np.asarray(value, np.float64)) / np.log1p(SCALES[name])


def activation_ops(program) -> tuple:
    """Indices of the ops with at least one operand that depends on the data input."""
    live, found = {program.inputs[-1]}, []
    for op in program.ops:
        if any(not isinstance(x, Constant) and x in live for x in op.inputs):
            live.update(op.outputs)
            found.append(op.index)
    return tuple(found)


def _op_type(op, layer) -> str:
    """The vocabulary entry of one op (layers by their kind)."""
    if layer is not None:
        return layer.kind
    if op.name == "conv_general_dilated":
        return "conv" if op.params["feature_group_count"] == 1 else "grouped_conv"
    if op.name == "dot_general":
        return "dense"
    return _TYPE_OF.get(op.name, "other")


def _spatial(shape) -> tuple:
    """(h, w) of an NHWC-like value; (1, 1) for values without spatial axes."""
    inner = tuple(shape[1:-1])[:2]
    return inner + (1,) * (2 - len(inner))


def _numeric(net, op, layer, live) -> dict:
    """Raw (unscaled) numeric features of one op node."""
    shapes = net.program.shapes
    out_shape = shapes[op.outputs[0]]
    values = [x for x in op.inputs if not isinstance(x, Constant)]
    activations = [x for x in values if x in live]
    features = dict.fromkeys(NUMERIC, 0)
    features["in_channels"] = shapes[activations[0]][-1] if shapes[activations[0]] else 1
    features["out_channels"] = out_shape[-1] if out_shape else 1
    features["out_h"], features["out_w"] = _spatial(out_shape)
    if layer is not None:
        kernel_h, kernel_w = (tuple(layer.kernel_size) + (1, 1))[:2]
        features.update(kernel_h=kernel_h, kernel_w=kernel_w, stride=max(layer.stride, default=1),
                        groups=layer.groups, in_channels=layer.in_channels, macs=layer.macs,
                        params=layer.params)
    elif op.name.startswith("reduce_window"):
        window, strides = op.params["window_dimensions"], op.params["window_strides"]
        features.update(kernel_h=_spatial(window)[0], kernel_w=_spatial(window)[1],
                        stride=max(strides[1:-1], default=1))
    else:
        features["params"] = sum(int(np.prod(shapes[x])) for x in values if x not in live)
    return features


def _node_row(op_type: str, numeric: dict, prunable: bool) -> np.ndarray:
    """One node's feature vector."""
    one_hot = np.eye(len(OP_TYPES))[OP_TYPES.index(op_type)]
    scaled = [scale(numeric[name], name) for name in NUMERIC]
    return np.concatenate([one_hot, scaled, [float(prunable)]]).astype(np.float32)


def computational_graph(net) -> jraph.GraphsTuple:
    """One-graph GraphsTuple of `net`'s data flow (see the module docstring for features)."""
    program = net.program
    data = program.inputs[-1]
    layer_of = {layer.op_index: layer for layer in net.layers}
    producer, live = {data: 0}, {data}
    channels = program.shapes[data][-1]
    input_numeric = dict.fromkeys(NUMERIC, 0)
    out_h, out_w = _spatial(program.shapes[data])
    input_numeric.update(in_channels=channels, out_channels=channels, out_h=out_h, out_w=out_w)
    rows, senders, receivers, positions = [_node_row("input", input_numeric, False)], [], [], []
    for node, index in enumerate(activation_ops(program), start=1):
        op = program.ops[index]
        layer = layer_of.get(index)
        for position, x in enumerate(op.inputs):
            if not isinstance(x, Constant) and x in live:
                senders.append(producer[x])
                receivers.append(node)
                positions.append(min(position, NUM_EDGE_FEATURES - 1))
        rows.append(_node_row(_op_type(op, layer), _numeric(net, op, layer, live),
                              net.value_group(op.outputs[0]) >= 0))
        live.update(op.outputs)
        producer.update(dict.fromkeys(op.outputs, node))
    edges = np.eye(NUM_EDGE_FEATURES, dtype=np.float32)[positions]
    return jraph.GraphsTuple(
        nodes=np.stack(rows), edges=edges,
        senders=np.array(senders, np.int32), receivers=np.array(receivers, np.int32),
        n_node=np.array([len(rows)], np.int32), n_edge=np.array([len(senders)], np.int32), globals=None)


def node_values(net) -> tuple:
    """The program value each node outputs: the data input, then each activation op's output."""
    program = net.program
    return (program.inputs[-1],) + tuple(program.ops[i].outputs[0] for i in activation_ops(program))


def node_groups(net) -> np.ndarray:
    """Channel group of each node's output channels (-1: none or not prunable)."""
    return np.array([net.value_group(v) for v in node_values(net)], np.int32)


def node_layers(net) -> np.ndarray:
    """Index in `net.layers` of the layer each node is (-1: not a convolution or dense layer)."""
    layer_of_value = {net.program.ops[l.op_index].outputs[0]: i for i, l in enumerate(net.layers)}
    return np.array([layer_of_value.get(v, -1) for v in node_values(net)], np.int32)


def node_stages(net) -> np.ndarray:
    """Stage of each node: spatial resolutions numbered in order of first appearance.

    A CNN's resolution only shrinks, so this cuts the node sequence at every resolution change;
    values without spatial axes (after global pooling) form the last stage.
    """
    shapes = net.program.shapes
    resolutions = [tuple(shapes[v][1:-1]) for v in node_values(net)]
    first_seen = {}
    for r in resolutions:
        first_seen.setdefault(r, len(first_seen))
    return np.array([first_seen[r] for r in resolutions], np.int32)


def _next_power_of_two(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def pad_graph(graph: jraph.GraphsTuple, n_node: int | None = None,
              n_edge: int | None = None) -> jraph.GraphsTuple:
    """`graph` plus one padding graph, to `n_node`/`n_edge` (default: next powers of two).

    Fixed sizes let one jit compilation serve every graph padded the same way.
    """
    nodes, edges = int(np.sum(graph.n_node)), int(np.sum(graph.n_edge))
    n_node = n_node or _next_power_of_two(nodes + 1)
    n_edge = n_edge or _next_power_of_two(max(edges, 1))
    if n_node <= nodes or n_edge < edges:
        raise InputShapeError(f"cannot pad a graph of {nodes} nodes and {edges} edges to "
                              f"{n_node} nodes (one more is needed for padding) and {n_edge} edges")
    return jraph.pad_with_graphs(graph, n_node, n_edge)
