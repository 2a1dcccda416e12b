"""Quantization: fake quantization with a traced bit width and its straight-through gradient."""
from agmc_jax.quant.fake import channel_scale, fake_quantize, levels, quantize
from agmc_jax.quant.packed import load_packed, save_packed
from agmc_jax.quant.qat import Quantized, freeze_bits, quantized_variables
from agmc_jax.quant.size import FLOAT_BITS, SizeModel, fits, size_bits, size_model

__all__ = ["channel_scale", "fake_quantize", "levels", "quantize"]
__all__ += ["Quantized", "freeze_bits", "quantized_variables", "save_packed", "load_packed"]
__all__ += ["FLOAT_BITS", "SizeModel", "fits", "size_bits", "size_model"]
