"""VGG-16 for CIFAR (Simonyan & Zisserman 2015) with BatchNorm and a single linear classifier."""
from typing import Sequence, Union

import flax.linen as nn

from agmc_jax.models.layers import ConvBN

VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    plan: Sequence[Union[int, str]] = VGG16_PLAN
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        for item in self.plan:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = ConvBN(item, 3)(x, train)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)
