"""The AGMC state (graph encoder-decoder) and the actor/critic heads: shapes, padding, training signal, causality."""
from functools import partial
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agmc_jax.agents import Actor, Critic
from agmc_jax.embed import EncoderDecoder, agmc_state, amc_state, graph_data, previous_actions
from agmc_jax.env import Budget, EnvConfig
from agmc_jax.graph import trace
from agmc_jax.graph.graphs import node_groups
from agmc_jax.kinds import Channels
from agmc_jax.models import create_model, init_model

HIDDEN = 16
MLP = (32, 32)
BATCH = 8


def _trace(name, shape):
    module = create_model(name)
    return trace(module, jax.eval_shape(lambda: init_model(module, shape)), shape)


def _channel_data(net, **padding):
    """Encoder inputs of channel pruning: step g acts on the nodes of channel group g."""
    return graph_data(net, node_groups(net), len(net.group_sizes), **padding)


@pytest.fixture(scope="module")
def resnet():
    return _trace("resnet20", (16, 16, 3))


@pytest.fixture(scope="module")
def mobilenet():
    return _trace("mobilenet_v2", (32, 32, 3))


@pytest.fixture(scope="module")
def budget(resnet):
    return Budget(Channels(resnet, EnvConfig()), EnvConfig())


@pytest.fixture(scope="module")
def networks(budget):
    """Actor and critic on the agmc state of resnet20, their parameters, jitted batched forward/loss functions."""
    state = agmc_state(budget, HIDDEN)
    actor, critic = Actor(state.encoder, MLP), Critic(state.encoder, MLP)
    obs = state.example
    init = jax.jit(lambda key: (actor.init(key, obs), critic.init(jax.random.fold_in(key, 1), obs, 0.5)))
    actor_params, critic_params = init(jax.random.key(0))
    act = jax.jit(jax.vmap(actor.apply, (None, 0)))

    def loss(params, batch, actions, targets):
        values = jax.vmap(critic.apply, (None, 0, 0))(params, batch, actions)
        return jnp.mean((values - targets) ** 2), values

    critic_step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return SimpleNamespace(state=state, data=state.encoder.data, obs=obs, actor_params=actor_params,
                           critic_params=critic_params, act=act, critic_step=critic_step)


def _encoder_params(params):
    return params["params"]["encoder"]["encoder_decoder"]


@partial(jax.jit, static_argnums=0)
def _apply_encoder(num_stages, params, graph, groups, stages, steps, prev_actions):
    return EncoderDecoder(num_stages, HIDDEN).apply({"params": params}, graph, groups, stages, steps,
                                                    prev_actions)


def _states(data, params, prev_actions):
    """Per-step embeddings of the encoder-decoder with `params` on `data` (graph passed as arrays)."""
    return _apply_encoder(data.num_stages, params, data.graph, data.node_groups, data.node_stages,
                          data.step_groups, prev_actions)


def _batch(seed, steps):
    """Observations at random steps (numpy randomness: nothing to compile)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, steps, BATCH).astype(np.int32)
    actions = rng.uniform(size=(BATCH, steps)) * (np.arange(steps)[None] < t[:, None])
    return {"t": jnp.asarray(t), "actions": jnp.asarray(actions, jnp.float32)}


def test_shapes_and_action_range(networks, resnet):
    """One state per step; actions in (0, 1), one Q per observation; observations hide the actions from t on."""
    steps = len(resnet.group_sizes)
    chex.assert_shape(networks.obs["actions"], (steps,))
    batch = _batch(2, steps)
    actions = networks.act(networks.actor_params, batch)
    (_, values), _ = networks.critic_step(networks.critic_params, batch, actions, jnp.zeros(BATCH))
    chex.assert_shape([actions, values], (BATCH,))
    assert jnp.all((actions > 0) & (actions < 1))
    encoder = _encoder_params(networks.actor_params)
    chex.assert_shape(_states(networks.data, encoder, previous_actions(networks.obs["actions"])), (steps, HIDDEN))
    obs = networks.state.observe(3, None, jnp.full(steps, 0.5, jnp.float32))
    assert int(obs["t"]) == 3
    np.testing.assert_array_equal(obs["actions"], [0.5] * 3 + [0.0] * (steps - 3))


def test_padding_does_not_change_embeddings(networks, resnet):
    """Padding the graph to more nodes and edges leaves every step's state unchanged."""
    encoder = _encoder_params(networks.actor_params)
    steps = len(resnet.group_sizes)
    prev = previous_actions(jnp.asarray(np.linspace(0.2, 0.8, steps, dtype=np.float32)))
    small, large = _channel_data(resnet), _channel_data(resnet, n_node=300, n_edge=400)
    assert small.graph.nodes.shape[0] != large.graph.nodes.shape[0]
    np.testing.assert_allclose(_states(small, encoder, prev), _states(large, encoder, prev), atol=1e-5)


def test_critic_loss_trains_the_encoder(networks, resnet):
    """The critic's loss has a non-zero gradient in every GCN parameter, and one Adam step moves them all."""
    batch = _batch(3, len(resnet.group_sizes))
    actions = np.linspace(0, 1, BATCH, dtype=np.float32)
    targets = np.linspace(-1, 1, BATCH, dtype=np.float32)
    _, grads = networks.critic_step(networks.critic_params, batch, actions, targets)
    graph = lambda params: _encoder_params(params)["GraphEncoder_0"]
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(graph(grads)))
    optimizer = optax.adam(1e-3)
    step = jax.jit(lambda p, g: optax.apply_updates(p, optimizer.update(g, optimizer.init(p), p)[0]))
    after = step(networks.critic_params, grads)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), graph(networks.critic_params), graph(after))
    assert all(jax.tree.leaves(changed))


def test_embeddings_differ_between_networks(networks, resnet, mobilenet):
    """The same encoder gives another network another first-step state."""
    encoder = _encoder_params(networks.actor_params)
    first = _states(_channel_data(resnet), encoder, jnp.zeros(len(resnet.group_sizes)))
    second = _states(_channel_data(mobilenet), encoder, jnp.zeros(len(mobilenet.group_sizes)))
    assert float(jnp.abs(first[0] - second[0]).max()) > 1e-4


def test_teacher_forcing_is_causal(networks, resnet):
    """Changing the action of step t changes the states after t only, and not the actor's choice at t."""
    encoder = _encoder_params(networks.actor_params)
    steps, t = len(resnet.group_sizes), 4
    actions = jnp.full((steps,), 0.3, jnp.float32)
    changed = actions.at[t].set(0.9)
    before = _states(networks.data, encoder, previous_actions(actions))
    after = _states(networks.data, encoder, previous_actions(changed))
    np.testing.assert_array_equal(before[:t + 1], after[:t + 1])
    assert float(jnp.abs(before[t + 1:] - after[t + 1:]).min(axis=1).max()) > 0
    batch = {"t": jnp.full((BATCH,), t, jnp.int32),
             "actions": jnp.stack([actions, changed] * (BATCH // 2))}
    chosen = networks.act(networks.actor_params, batch)
    assert chosen[0] == chosen[1]


def test_amc_heads(budget):
    """Heads without an encoder read AMC's feature vector: one action in [0, 1] and one Q per observation."""
    state = amc_state(budget)
    actor, critic = Actor(None, MLP), Critic(None, MLP)

    @jax.jit
    def run(key, actions):
        obs = jax.vmap(lambda t: state.observe(t, jnp.asarray(budget.sizes, jnp.int32), actions))(jnp.arange(BATCH))
        actor_params = actor.init(key, state.example)
        critic_params = critic.init(jax.random.fold_in(key, 1), state.example, 0.5)
        chosen = jax.vmap(actor.apply, (None, 0))(actor_params, obs)
        return obs, chosen, jax.vmap(critic.apply, (None, 0, 0))(critic_params, obs, chosen[:, None])

    obs, actions, values = run(jax.random.key(4), jnp.linspace(0, 1, budget.steps, dtype=jnp.float32))
    chex.assert_shape(obs, (BATCH, *state.example.shape))
    chex.assert_shape([actions, values], (BATCH,))
    assert jnp.all((actions >= 0) & (actions <= 1))
