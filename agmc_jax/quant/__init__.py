"""Quantization: fake quantization with a traced bit width and its straight-through gradient."""
from agmc_jax.quant.fake import channel_scale, fake_quantize, levels, quantize

__all__ = ["channel_scale", "fake_quantize", "levels", "quantize"]
