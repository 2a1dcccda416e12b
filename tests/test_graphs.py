"""The computational graph: nodes, features, edges, stages, groups and padding for one jit."""
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from agmc_jax.errors import InputShapeError
from agmc_jax.graph import graphs, trace
from agmc_jax.graph.ir import Constant
from agmc_jax.models import create_model, init_model

SHAPES = {"resnet20": (16, 16, 3), "mobilenet_v2": (32, 32, 3), "lenet5": (28, 28, 1)}


@pytest.fixture(scope="module")
def nets():
    """Traced zoo networks at small inputs (abstract variables are enough to trace)."""
    result = {}
    for name, shape in SHAPES.items():
        module = create_model(name)
        variables = jax.eval_shape(lambda: init_model(module, shape))
        result[name] = trace(module, variables, shape)
    return result


def _activation_ops(program):
    live, ops = {program.inputs[-1]}, []
    for op in program.ops:
        if any(not isinstance(x, Constant) and x in live for x in op.inputs):
            live.update(op.outputs)
            ops.append(op.index)
    return ops


def _reachable(start, senders, receivers, n):
    adjacency = [[] for _ in range(n)]
    for s, r in zip(senders, receivers):
        adjacency[s].append(r)
    seen, todo = {start}, [start]
    while todo:
        for nxt in adjacency[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("name", SHAPES)
def test_nodes_are_input_plus_activation_ops(nets, name):
    net = nets[name]
    graph = net.graph
    n = len(_activation_ops(net.program)) + 1
    assert graph.nodes.shape == (n, graphs.NUM_FEATURES) and graph.nodes.dtype == np.float32
    assert graph.n_node.tolist() == [n] and graph.n_edge.tolist() == [len(graph.senders)]
    assert graph.edges.shape == (len(graph.senders), graphs.NUM_EDGE_FEATURES)
    assert graph.nodes[0, graphs.FEATURES.index("type_input")] == 1
    assert np.all(graph.nodes.sum(axis=1) > 0) and np.all(np.isfinite(graph.nodes))
    assert graph.nodes[:, len(graphs.OP_TYPES):].max() <= 1.0
    assert len(graphs.node_groups(net)) == n and len(graphs.node_stages(net)) == n


@pytest.mark.parametrize("name", SHAPES)
def test_every_layer_is_a_node_with_its_macs(nets, name):
    net = nets[name]
    node_of = {index: node for node, index in enumerate(_activation_ops(net.program), start=1)}
    macs = graphs.FEATURES.index("macs")
    for layer in net.layers:
        row = net.graph.nodes[node_of[layer.op_index]]
        assert row[graphs.FEATURES.index(f"type_{layer.kind}")] == 1
        decoded = np.expm1(row[macs] * np.log1p(graphs.SCALES["macs"]))
        np.testing.assert_allclose(decoded, layer.macs, rtol=1e-4)
        assert row[graphs.FEATURES.index("prunable")] == float(layer.out_group >= 0)


@pytest.mark.parametrize("name", SHAPES)
def test_edges_form_a_dag_from_input_to_output(nets, name):
    net = nets[name]
    graph = net.graph
    n = int(graph.n_node[0])
    senders, receivers = graph.senders.tolist(), graph.receivers.tolist()
    assert all(s < r for s, r in zip(senders, receivers))
    assert _reachable(0, senders, receivers, n) == set(range(n))
    assert _reachable(n - 1, receivers, senders, n) == set(range(n))


def test_resnet20_residual_adds_have_two_inputs(nets):
    graph = nets["resnet20"].graph
    add = graphs.FEATURES.index("type_add")
    in_degree = np.bincount(graph.receivers, minlength=graph.nodes.shape[0])
    residual = (graph.nodes[:, add] == 1) & (in_degree == 2)
    assert residual.sum() == 9
    assert set(in_degree[graph.nodes[:, add] == 1].tolist()) == {1, 2}


def test_node_groups_cover_every_group(nets):
    net = nets["resnet20"]
    groups = graphs.node_groups(net)
    assert set(range(len(net.group_sizes))) <= set(groups.tolist())
    assert len(net.group_sizes) == 12 and groups[0] == -1


def test_node_stages_follow_resolution(nets):
    stages = graphs.node_stages(nets["resnet20"])
    assert stages[0] == 0 and np.all(np.diff(stages) >= 0)
    assert stages.max() == 3  # 16x16, 8x8, 4x4, then globally pooled


def test_padded_graphs_share_one_compilation(nets):
    compiles = []

    @jax.jit
    def embed(graph, weight):
        compiles.append(1)
        gcn = jraph.GraphConvolution(lambda x: x @ weight, add_self_edges=True)
        mask = jraph.get_node_padding_mask(graph)
        return jnp.sum(jnp.where(mask[:, None], gcn(graph).nodes, 0.0), axis=0)

    weight = jnp.ones((graphs.NUM_FEATURES, 4))
    padded = [graphs.pad_graph(nets[name].graph, 512, 512) for name in ("resnet20", "mobilenet_v2")]
    outputs = [embed(jax.tree.map(jnp.asarray, g), weight) for g in padded]
    assert len(compiles) == 1
    assert not np.allclose(outputs[0], outputs[1])


def test_pad_graph_defaults_and_limits(nets):
    graph = nets["resnet20"].graph
    padded = graphs.pad_graph(graph)
    n, e = int(graph.n_node[0]), int(graph.n_edge[0])
    assert padded.nodes.shape[0] >= n + 1 and padded.nodes.shape[0] & (padded.nodes.shape[0] - 1) == 0
    assert padded.senders.shape[0] >= e and padded.n_node.tolist()[0] == n
    with pytest.raises(InputShapeError):
        graphs.pad_graph(graph, n, e)
