"""AGMC's state encoder: a GCN over the computational graph and an LSTM over pruning steps.

`GraphEncoder` embeds every node with GCN layers (jraph, symmetric normalisation, self-loops,
edges taken in both directions), averages nodes within each resolution stage and turns the
stage embeddings into one network embedding. `EncoderDecoder` runs an LSTM over the pruning
steps; step t reads the network embedding, the mean embedding of the nodes of the channel group
that step t prunes, and the action of step t-1 (teacher forcing: one pass per episode).

`AGMCEncoder` maps one observation `{'t': int32[], 'actions': float32[T]}` (the episode's actions
so far, zeros from t on) to the state of step t. An agent's actor and critic each own one, so each
one's loss trains its encoder. The graph is the same for every observation, so under vmap the GCN
runs once and only the LSTM is batched.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from agmc_jax.graph.graphs import node_stages, pad_graph


@dataclasses.dataclass(frozen=True, eq=False)
class GraphData:
    """The static inputs of the AGMC encoder, hashed by identity so modules may hold it."""

    graph: jraph.GraphsTuple  # padded with `pad_graph`
    node_groups: np.ndarray  # int32[N_pad]: the step each node belongs to (a channel group, a layer), -1 if none
    node_stages: np.ndarray  # int32[N_pad]: resolution stage of each node, -1 for padding
    step_groups: np.ndarray  # int32[T]: the node key each step acts on (arange(T))
    num_stages: int

    @property
    def num_steps(self) -> int:
        return len(self.step_groups)


def _pad_to(values: np.ndarray, size: int) -> np.ndarray:
    """`values` followed by -1 up to `size` entries."""
    return np.concatenate([values, np.full(size - len(values), -1, np.int32)]).astype(np.int32)


def graph_data(net, node_steps, steps, n_node=None, n_edge=None) -> GraphData:
    """Encoder inputs for a traced `Network` whose step t acts on the graph nodes with `node_steps == t`."""
    graph = pad_graph(net.graph, n_node, n_edge)
    size = graph.nodes.shape[0]
    stages = node_stages(net)
    return GraphData(graph, _pad_to(np.asarray(node_steps), size), _pad_to(stages, size),
                     np.arange(steps, dtype=np.int32), int(stages.max()) + 1)


def previous_actions(actions):
    """Teacher-forcing inputs: entry t is the action of step t-1 (0 at t = 0)."""
    return jnp.concatenate([jnp.zeros_like(actions[:1]), actions[:-1]])


def _symmetric(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
    """`graph` with every edge also reversed, so messages flow both ways along the data flow."""
    return graph._replace(senders=jnp.concatenate([graph.senders, graph.receivers]),
                          receivers=jnp.concatenate([graph.receivers, graph.senders]), edges=None)


def _masked_mean(members, values):
    """Row-wise mean of `values` over the True entries of `members` [K, N] (0 if none)."""
    weights = members.astype(values.dtype)
    return weights @ values / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)


class GraphEncoder(nn.Module):
    """GCN node embeddings and a network embedding pooled stage by stage."""

    num_stages: int
    hidden: int = 32
    num_layers: int = 3

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, node_stages):
        """(node embeddings [N, hidden], network embedding [hidden]); padding nodes are ignored."""
        mask = jraph.get_node_padding_mask(graph)
        graph = _symmetric(graph)._replace(nodes=nn.relu(nn.Dense(self.hidden)(graph.nodes)))
        for _ in range(self.num_layers):
            gcn = jraph.GraphConvolution(nn.Dense(self.hidden), add_self_edges=True)
            graph = graph._replace(nodes=nn.relu(gcn(graph).nodes))
        nodes = graph.nodes
        in_stage = (node_stages[None, :] == jnp.arange(self.num_stages)[:, None]) & mask[None, :]
        stages = _masked_mean(in_stage, nodes)
        present = in_stage.any(axis=1)
        mean = _masked_mean(present[None, :], stages)[0]
        peak = jnp.max(jnp.where(present[:, None], stages, -jnp.inf), axis=0)
        network = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([mean, peak])))
        return nodes, network


class EncoderDecoder(nn.Module):
    """Per-step states [T, hidden] from the graph and the previous actions [T]."""

    num_stages: int
    hidden: int = 32
    gcn_layers: int = 3

    @nn.compact
    def __call__(self, graph, node_groups, node_stages, step_groups, prev_actions):
        """LSTM over steps of concat(network embedding, step-group embedding, previous action)."""
        nodes, network = GraphEncoder(self.num_stages, self.hidden, self.gcn_layers)(graph, node_stages)
        groups = _masked_mean(node_groups[None, :] == step_groups[:, None], nodes)
        steps = len(step_groups)
        inputs = jnp.concatenate([jnp.broadcast_to(network, (steps, self.hidden)), groups,
                                  prev_actions[:, None].astype(nodes.dtype)], axis=-1)
        return nn.RNN(nn.OptimizedLSTMCell(self.hidden))(inputs)


class AGMCEncoder(nn.Module):
    """AGMC's state of one observation `{'t', 'actions'}`: the LSTM state of step t over the graph embedding."""

    data: GraphData
    hidden: int = 32

    @nn.compact
    def __call__(self, obs):
        """float32[hidden] state of step `obs['t']` (the actions so far are teacher-forced)."""
        encoder = EncoderDecoder(self.data.num_stages, self.hidden, name="encoder_decoder")
        states = encoder(jax.tree.map(jnp.asarray, self.data.graph), jnp.asarray(self.data.node_groups),
                         jnp.asarray(self.data.node_stages), jnp.asarray(self.data.step_groups),
                         previous_actions(jnp.asarray(obs["actions"], jnp.float32)))
        return states[obs["t"]]
