"""The AGMC encoder-decoder and the actor/critic heads: shapes, padding, training signal, causality."""
from functools import partial
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agmc_jax.embed import (AMCActor, AMCCritic, EncoderDecoder, graph_data, make_agmc_networks,
                            previous_actions)
from agmc_jax.graph import trace
from agmc_jax.models import create_model, init_model

HIDDEN = 16
MLP = (32, 32)
BATCH = 8


def _trace(name, shape):
    module = create_model(name)
    return trace(module, jax.eval_shape(lambda: init_model(module, shape)), shape)


@pytest.fixture(scope="module")
def resnet():
    return _trace("resnet20", (16, 16, 3))


@pytest.fixture(scope="module")
def mobilenet():
    return _trace("mobilenet_v2", (32, 32, 3))


@pytest.fixture(scope="module")
def networks(resnet):
    """Actor and critic on resnet20, their parameters, and jitted batched forward/loss functions."""
    actor, critic, obs = make_agmc_networks(resnet, hidden=HIDDEN, mlp=MLP)
    init = jax.jit(lambda key: (actor.init(key, obs), critic.init(jax.random.fold_in(key, 1), obs, 0.5)))
    actor_params, critic_params = init(jax.random.key(0))
    act = jax.jit(jax.vmap(actor.apply, (None, 0)))

    def loss(params, batch, actions, targets):
        values = jax.vmap(critic.apply, (None, 0, 0))(params, batch, actions)
        return jnp.mean((values - targets) ** 2), values

    critic_step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return SimpleNamespace(actor=actor, obs=obs, actor_params=actor_params,
                           critic_params=critic_params, act=act, critic_step=critic_step)


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
    steps = len(resnet.group_sizes)
    chex.assert_shape(networks.obs["actions"], (steps,))
    batch = _batch(2, steps)
    actions = networks.act(networks.actor_params, batch)
    (_, values), _ = networks.critic_step(networks.critic_params, batch, actions, jnp.zeros(BATCH))
    chex.assert_shape([actions, values], (BATCH,))
    assert jnp.all((actions > 0) & (actions < 1))
    encoder = networks.actor_params["params"]["encoder_decoder"]
    chex.assert_shape(_states(networks.actor.data, encoder, previous_actions(networks.obs["actions"])),
                      (steps, HIDDEN))


def test_padding_does_not_change_embeddings(networks, resnet):
    encoder = networks.actor_params["params"]["encoder_decoder"]
    steps = len(resnet.group_sizes)
    prev = previous_actions(jnp.asarray(np.linspace(0.2, 0.8, steps, dtype=np.float32)))
    small, large = graph_data(resnet), graph_data(resnet, n_node=300, n_edge=400)
    assert small.graph.nodes.shape[0] != large.graph.nodes.shape[0]
    np.testing.assert_allclose(_states(small, encoder, prev), _states(large, encoder, prev), atol=1e-5)


def test_critic_loss_trains_the_encoder(networks, resnet):
    batch = _batch(3, len(resnet.group_sizes))
    actions = np.linspace(0, 1, BATCH, dtype=np.float32)
    targets = np.linspace(-1, 1, BATCH, dtype=np.float32)
    _, grads = networks.critic_step(networks.critic_params, batch, actions, targets)
    graph_grads = grads["params"]["encoder_decoder"]["GraphEncoder_0"]
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(graph_grads))
    optimizer = optax.adam(1e-3)
    step = jax.jit(lambda p, g: optax.apply_updates(p, optimizer.update(g, optimizer.init(p), p)[0]))
    after = step(networks.critic_params, grads)
    encoder = lambda params: params["params"]["encoder_decoder"]["GraphEncoder_0"]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                           encoder(networks.critic_params), encoder(after))
    assert all(jax.tree.leaves(changed))


def test_embeddings_differ_between_networks(networks, resnet, mobilenet):
    encoder = networks.actor_params["params"]["encoder_decoder"]
    first = _states(graph_data(resnet), encoder, jnp.zeros(len(resnet.group_sizes)))
    second = _states(graph_data(mobilenet), encoder, jnp.zeros(len(mobilenet.group_sizes)))
    assert float(jnp.abs(first[0] - second[0]).max()) > 1e-4


def test_teacher_forcing_is_causal(networks, resnet):
    encoder = networks.actor_params["params"]["encoder_decoder"]
    steps, t = len(resnet.group_sizes), 4
    actions = jnp.full((steps,), 0.3, jnp.float32)
    changed = actions.at[t].set(0.9)
    before = _states(networks.actor.data, encoder, previous_actions(actions))
    after = _states(networks.actor.data, encoder, previous_actions(changed))
    np.testing.assert_array_equal(before[:t + 1], after[:t + 1])
    assert float(jnp.abs(before[t + 1:] - after[t + 1:]).min(axis=1).max()) > 0
    batch = {"t": jnp.full((BATCH,), t, jnp.int32),
             "actions": jnp.stack([actions, changed] * (BATCH // 2))}
    chosen = networks.act(networks.actor_params, batch)
    assert chosen[0] == chosen[1]


def test_amc_heads():
    actor, critic = AMCActor(MLP), AMCCritic(MLP)

    @jax.jit
    def run(key, obs):
        actor_params = actor.init(key, obs[0])
        critic_params = critic.init(jax.random.fold_in(key, 1), obs[0], 0.5)
        actions = jax.vmap(actor.apply, (None, 0))(actor_params, obs)
        return actions, jax.vmap(critic.apply, (None, 0, 0))(critic_params, obs, actions[:, None])

    obs = np.random.default_rng(5).normal(size=(BATCH, 11)).astype(np.float32)
    actions, values = run(jax.random.key(4), obs)
    chex.assert_shape([actions, values], (BATCH,))
    assert jnp.all((actions >= 0) & (actions <= 1))
