"""Building blocks shared by the zoo: conv + BatchNorm (+ ReLU) in NHWC."""
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

BatchNorm = partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class ConvBN(nn.Module):
    """A bias-free convolution, BatchNorm and an optional activation."""

    features: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    activation: callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                    padding=[(self.kernel // 2, self.kernel // 2)] * 2,
                    feature_group_count=self.groups, use_bias=False)(x)
        x = BatchNorm(use_running_average=not train)(x)
        return x if self.activation is None else self.activation(x)


def global_avg_pool(x):
    """Mean over the spatial axes of an NHWC map."""
    return jnp.mean(x, axis=(1, 2))
