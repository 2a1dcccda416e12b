"""Linear symmetric per-output-channel quantization with a traced bit width, and its straight-through gradient.

A kernel's last axis is its output channels (Linen's HWIO convolutions and (in, out) dense layers), so
each output channel gets one scale: max|w| / (2^(b-1) - 1) over the other axes. One bit is the sign
times the channel's mean |w| (binary weights). `bits` may be a traced value: one compiled program
serves every bit width.
"""
import jax
import jax.numpy as jnp


def levels(bits):
    """The largest code of a b-bit symmetric quantizer, 2^(b-1) - 1 (1 for one bit: codes are -1 and +1)."""
    return jnp.maximum(jnp.ldexp(jnp.float32(1), jnp.asarray(bits, jnp.int32) - 1) - 1, 1.0)  # exact to 16 bits


def _reduce_axes(w):
    return tuple(range(w.ndim - 1))


def channel_scale(w, bits):
    """Per output channel: max|w| / levels(bits), or the mean |w| for one bit (never 0)."""
    absolute = jnp.abs(w)
    peak = jnp.max(absolute, axis=_reduce_axes(w)) / levels(bits)
    mean = jnp.mean(absolute, axis=_reduce_axes(w))
    return jnp.maximum(jnp.where(jnp.asarray(bits) <= 1, mean, peak), jnp.finfo(jnp.float32).tiny)


def quantize(w, bits, scale=None):
    """(integer codes, per-channel scale): codes in [-levels, levels], or in {-1, +1} for one bit."""
    scale = channel_scale(w, bits) if scale is None else scale
    top = levels(bits)
    rounded = jnp.clip(jnp.round(w / scale), -top, top)
    codes = jnp.where(jnp.asarray(bits) <= 1, jnp.where(w >= 0, 1.0, -1.0), rounded)
    return codes.astype(jnp.int32), scale


def fake_quantize(w, bits, scale=None):
    """w on its b-bit grid (exactly codes times scales); the gradient is the straight-through estimator: 1 where
    w lies inside the clipping range [-levels * scale, levels * scale], 0 outside (the scale is not
    differentiated). Inside is judged on w / scale, the value that is rounded, so a channel's largest weight
    is always inside."""
    scale = jax.lax.stop_gradient(channel_scale(w, bits) if scale is None else scale)
    codes, _ = quantize(w, bits, scale)
    quantized = jax.lax.stop_gradient(codes.astype(w.dtype) * scale.astype(w.dtype))
    inside = jnp.abs(w / scale) <= levels(bits) * (1 + 1e-6)
    return quantized + jnp.where(inside, w - jax.lax.stop_gradient(w), 0.0)
