"""The size model of a quantized network: its size in bits, linear in the searched layers' bit widths, exact.

size = fixed + sum_t bits[t] * weights[t], where `fixed` counts what no policy changes: 32 bits per
per-output-channel scale of every quantized kernel, 32 bits per element of every other variable
(biases, BatchNorm parameters and statistics) and the pinned kernels at their bits. Sizes in bits pass
2^24 (where float32 integers stop being exact) on any network of more than ~500k weights, so the
budget test is done in integers: int64 on the host, and in jax.numpy (32-bit integers only, without
x64) as two int32 limbs of 16 bits, exact for up to 2047 steps of at most 2^31 weights each.
"""
from typing import Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

FLOAT_BITS = 32  # a float left unquantized, and each per-channel scale
MAX_STEPS = 2047  # sum_t bits[t] * (weights[t] mod 2^16) stays below 2^31 for bits <= 16
MAX_WEIGHTS = 2 ** 31 - 1  # weights >> 16 is then below 2^15
_LIMB = 16


class SizeModel(NamedTuple):
    """size in bits = fixed + sum_t bits[t] * weights[t] (integers)."""

    weights: np.ndarray  # int64 [T]: kernel elements of each searched layer
    fixed: int  # bits that no policy changes
    float32: int  # the size of every variable in float32: what a size budget is a fraction of


def size_model(shapes: Sequence[tuple], searched: Sequence[int], pinned: Mapping[int, int]) -> SizeModel:
    """The size model of variables with leaf `shapes`: leaves `searched` get a searched bit width, leaves
    `pinned` (leaf -> bits) a fixed one; kernels keep one float scale per output channel (last axis)."""
    elements = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    quantized = set(searched) | set(pinned)
    fixed = sum(FLOAT_BITS * (shapes[leaf][-1] if leaf in quantized else elements[leaf])
                for leaf in range(len(shapes)))
    fixed += sum(bits * elements[leaf] for leaf, bits in pinned.items())
    return SizeModel(np.array([elements[leaf] for leaf in searched], np.int64), int(fixed),
                     FLOAT_BITS * sum(elements))


def size_bits(model: SizeModel, bits, xp=np):
    """The size in bits of a policy: exact float64 in NumPy, float32 (rounded beyond 2^24) in jax.numpy."""
    if xp is np:
        return float(model.fixed + int(np.dot(np.asarray(bits, np.int64), model.weights)))
    return model.fixed + jnp.sum(jnp.asarray(bits, jnp.float32) * jnp.asarray(model.weights, jnp.float32))


def _split(values):
    """Non-negative integers as (high, low) int32 limbs: value = high * 2^16 + low."""
    values = np.asarray(values, np.int64)
    return (values >> _LIMB).astype(np.int32), (values & (2 ** _LIMB - 1)).astype(np.int32)


def limbs(model: SizeModel, bits):
    """sum_t bits[t] * weights[t] as exact (high, low) int32 limbs, low < 2^16 (traceable, no x64)."""
    high, low = (jnp.asarray(part) for part in _split(model.weights))
    bits = jnp.asarray(bits, jnp.int32)
    low_sum = jnp.sum(bits * low)
    return jnp.sum(bits * high) + (low_sum >> _LIMB), low_sum & (2 ** _LIMB - 1)


def fits(model: SizeModel, bits, limit: float, xp=np):
    """Whether the policy's size is at most `limit` bits, decided exactly (NumPy int64, or int32 limbs)."""
    room = int(np.floor(limit)) - model.fixed
    if xp is np:
        return room >= 0 and int(np.dot(np.asarray(bits, np.int64), model.weights)) <= room
    if room < 0:
        return jnp.asarray(False)
    high, low = limbs(model, bits)
    room_high, room_low = _split(room)
    return (high < room_high) | ((high == room_high) & (low <= room_low))
