"""Quantization-aware training: any Linen module run on fake-quantized kernels, with the same variables.

`Quantized(module, bits)` replaces, in its forward pass, each kernel named in `bits` by its b-bit fake
quantization (`fake_quantize`: per-output-channel scale, straight-through gradient). The stored float
kernels stay the trained ("latent") ones, so `agmc_jax.train.train(config, workdir, module=Quantized(...),
variables=...)` fine-tunes the network unchanged; what the network computes with is
`quantized_variables(variables, bits)`, the codes times the scales that the packed export stores.
"""
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from agmc_jax.errors import QuantizationError
from agmc_jax.quant.fake import fake_quantize

MIN_BITS, MAX_BITS = 1, 16


def path_names(path) -> tuple:
    """A jax key path as a tuple of strings, e.g. ('params', 'Conv_0', 'kernel') (as `Layer.kernel_path`)."""
    return tuple(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _width(path, width) -> int:
    """`width` as an int, or a `QuantizationError` unless it is a whole number of bits in 1..16."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not MIN_BITS <= width <= MAX_BITS:
        raise QuantizationError(f"bit width {width!r} for {'/'.join(path)} is outside {MIN_BITS}..{MAX_BITS}; "
                                f"give a whole number of bits from {MIN_BITS} to {MAX_BITS}")
    return int(width)


def freeze_bits(bits) -> tuple:
    """`bits` (a mapping, or pairs, of kernel path -> bit width, e.g. read back from JSON) as a sorted, hashable
    tuple of (path tuple of strings, int) pairs; widths outside 1..16 are a `QuantizationError`."""
    try:
        pairs = [(tuple(str(key) for key in path), width)
                 for path, width in (bits.items() if isinstance(bits, Mapping) else bits)]
    except (TypeError, ValueError) as error:
        raise QuantizationError(f"bits must map kernel paths to bit widths, got {bits!r:.80}") from error
    return tuple(sorted((path, _width(path, width)) for path, width in dict(pairs).items()))


def map_kernels(fn, variables, bits):
    """`variables` with each kernel named in `bits` replaced by `fn(kernel, width)`; a named leaf that is missing or
    is not a kernel (rank < 2, output channels last) is a `QuantizationError`."""
    widths = dict(freeze_bits(bits))

    def visit(path, leaf):
        names = path_names(path)
        if names not in widths:
            return leaf
        if np.ndim(leaf) < 2:
            raise QuantizationError(f"{'/'.join(names)} has shape {np.shape(leaf)}, not a kernel; give bits only "
                                    "for kernels (rank 2 or more, output channels last)")
        return fn(leaf, widths[names])

    present = {path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
    missing = sorted(set(widths) - present)
    if missing:
        raise QuantizationError(f"the network has no variable {'/'.join(missing[0])}; give bits only for its kernels "
                                "(e.g. the kernel_path of each layer of agmc_jax.graph.trace)")
    return jax.tree_util.tree_map_with_path(visit, variables)


def quantized_variables(variables, bits):
    """The variables a `Quantized(module, bits)` network computes with: its kernels exactly on their b-bit grids."""
    return map_kernels(fake_quantize, variables, bits)


def _forward(wrapper, *args, **kwargs):
    return wrapper.module(*args, **kwargs)


class Quantized(nn.Module):
    """`module` computing with the kernels named in `bits` fake-quantized (same variable tree as `module`; it may be
    a `Slimmed` one).

    `bits`: kernel path -> bit width pairs (any form `freeze_bits` takes; stored frozen, so the module hashes).
    """

    module: Any
    bits: tuple

    def __post_init__(self):
        object.__setattr__(self, "bits", freeze_bits(self.bits))
        super().__post_init__()

    def setup(self):
        nn.share_scope(self, self.module)

    def _fake_quantized(self, variables):
        return variables if self.is_initializing() else quantized_variables(variables, self.bits)

    def __call__(self, *args, **kwargs):
        forward = nn.map_variables(_forward, "params", self._fake_quantized, init=self.is_initializing())
        return forward(self, *args, **kwargs)
