"""MobileNet-V1 (Howard et al. 2017) and MobileNet-V2 (Sandler et al. 2018) with a width multiplier."""
import flax.linen as nn

from agmc_jax.models.layers import ConvBN, global_avg_pool

# (output channels, stride) of each depthwise-separable block.
V1_PLAN = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
           (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# (expansion, output channels, repeats, first stride) of each inverted-residual stage.
V2_PLAN = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))


def scaled(channels: int, multiplier: float, divisor: int = 8) -> int:
    """Channels times the width multiplier, rounded to a multiple of `divisor` (never below 90%)."""
    value = max(divisor, int(channels * multiplier + divisor / 2) // divisor * divisor)
    return value + divisor if value < 0.9 * channels * multiplier else value


class MobileNetV1(nn.Module):
    num_classes: int = 1000
    width: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(scaled(32, self.width), 3, 2)(x, train)
        for channels, stride in V1_PLAN:
            x = ConvBN(x.shape[-1], 3, stride, groups=x.shape[-1])(x, train)
            x = ConvBN(scaled(channels, self.width), 1)(x, train)
        return nn.Dense(self.num_classes)(global_avg_pool(x))


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1; residual when `in_features == features`, stride 1."""

    in_features: int
    features: int
    stride: int
    expansion: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = self.in_features * self.expansion
        y = ConvBN(hidden, 1, activation=nn.relu6)(x, train) if self.expansion != 1 else x
        y = ConvBN(hidden, 3, self.stride, groups=y.shape[-1], activation=nn.relu6)(y, train)
        y = ConvBN(self.features, 1, activation=None)(y, train)
        return x + y if self.stride == 1 and self.in_features == self.features else y


class MobileNetV2(nn.Module):
    num_classes: int = 1000
    width: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = scaled(32, self.width)
        x = ConvBN(features, 3, 2, activation=nn.relu6)(x, train)
        for expansion, channels, repeats, stride in V2_PLAN:
            for index in range(repeats):
                out = scaled(channels, self.width)
                x = InvertedResidual(features, out, stride if index == 0 else 1, expansion)(x, train)
                features = out
        last = scaled(1280, max(1.0, self.width))
        x = ConvBN(last, 1, activation=nn.relu6)(x, train)
        return nn.Dense(self.num_classes)(global_avg_pool(x))
