"""Actor and critic heads on a state's encoder: MLPs as AMC's DDPG uses them (300-300, small last layer)."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _small_uniform(key, shape, dtype=jnp.float32):
    """DDPG's final-layer init, U(-3e-3, 3e-3), so first outputs sit near the middle."""
    return jax.random.uniform(key, shape, dtype, -3e-3, 3e-3)


class MLP(nn.Module):
    """ReLU hidden layers, then one linear output with a small initialisation."""

    features: Sequence[int] = (300, 300)

    @nn.compact
    def __call__(self, x):
        """A scalar from the feature vector `x`."""
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(1, kernel_init=_small_uniform)(x)[0]


def _features(encoder, obs):
    """The encoder's features of `obs` (the observation itself without an encoder)."""
    return jnp.atleast_1d(obs if encoder is None else encoder(obs)).astype(jnp.float32)


class Actor(nn.Module):
    """observation -> action in [0, 1] through the state's encoder (trained with the actor's loss)."""

    encoder: Any = None
    mlp: Sequence[int] = (300, 300)

    @nn.compact
    def __call__(self, obs):
        """float32[] action."""
        return nn.sigmoid(MLP(self.mlp)(_features(self.encoder, obs)))


class Critic(nn.Module):
    """(observation, action) -> Q through the state's encoder (trained with the critic's loss)."""

    encoder: Any = None
    mlp: Sequence[int] = (300, 300)

    @nn.compact
    def __call__(self, obs, action):
        """float32[] Q value; `action` is a scalar or shape [1]."""
        features = _features(self.encoder, obs)
        return MLP(self.mlp)(jnp.concatenate([features, jnp.reshape(action, (1,)).astype(features.dtype)]))


def batch_apply(module, params, *batched):
    """`module.apply(params, *row)` as a scalar for every row of the batched inputs (actors, critics)."""
    return jax.vmap(lambda *row: jnp.reshape(module.apply(params, *row), ()))(*batched)
