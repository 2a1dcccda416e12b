"""ResNets: the CIFAR family (He et al. 2016, three stages of 16/32/64) and ImageNet ResNet-18/50.

Shortcuts that change shape are 1x1 convolutions with BatchNorm (option B), so every residual
stage is a channel group that the tracer can prune as a whole. Whether a block has a projection
is configuration, never read off the input's width: a slimmed network keeps its structure.
"""
from typing import Sequence

import flax.linen as nn

from agmc_jax.models.layers import ConvBN, global_avg_pool


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    projection: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = ConvBN(self.features, 3, self.stride)(x, train)
        y = ConvBN(self.features, 3, 1, activation=None)(y, train)
        if self.projection:
            x = ConvBN(self.features, 1, self.stride, activation=None)(x, train)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    features: int
    stride: int = 1
    projection: bool = False
    expansion: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = self.features * self.expansion
        y = ConvBN(self.features, 1)(x, train)
        y = ConvBN(self.features, 3, self.stride)(y, train)
        y = ConvBN(out, 1, activation=None)(y, train)
        if self.projection:
            x = ConvBN(out, 1, self.stride, activation=None)(x, train)
        return nn.relu(x + y)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: a 3x3 stem and three stages of n basic blocks."""

    depth: int = 20
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        blocks = (self.depth - 2) // 6
        x = ConvBN(self.widths[0], 3)(x, train)
        for stage, width in enumerate(self.widths):
            for block in range(blocks):
                first = stage > 0 and block == 0
                x = BasicBlock(width, 2 if first else 1, projection=first)(x, train)
        return nn.Dense(self.num_classes)(global_avg_pool(x))


class ResNetImageNet(nn.Module):
    """ResNet-18/34 (basic blocks) and -50/101 (bottlenecks) with the 7x7 stride-2 stem."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    bottleneck: bool = False
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(64, 7, 2)(x, train)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        block = Bottleneck if self.bottleneck else BasicBlock
        for stage, size in enumerate(self.stage_sizes):
            for index in range(size):
                stride = 2 if stage > 0 and index == 0 else 1
                projection = index == 0 and (stage > 0 or self.bottleneck)
                x = block(64 * 2**stage, stride, projection)(x, train)
        return nn.Dense(self.num_classes)(global_avg_pool(x))
