"""Portable export: a network as a `jax.export` artifact (serialized StableHLO, batch size symbolic) plus its
weights, which any process with jax and numpy runs without the Python code that defined the network.

A directory holds `model.stablehlo` (the program: weights and images in, logits out, lowered for CPU, CUDA and
TPU), `weights.npz` (its weights by variable path) and `export.json` (input shape, sizes, how to load). A
quantized network's kernels are stored as in its packed export, b-bit codes packed into bytes plus float32
per-channel scales, and the program unpacks them: the weights file is the packed size, not float32's.
"""
import hashlib
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax import checkpoint
from agmc_jax.errors import CheckpointError, InputShapeError
from agmc_jax.graph import trace
from agmc_jax.prune import fold_batchnorm
from agmc_jax.quant import Quantized, freeze_bits
from agmc_jax.quant.packed import codes_from_offsets, packed_kernel, quantized_kernels
from agmc_jax.quant.qat import path_names

PROGRAM, WEIGHTS, DESCRIPTION = "model.stablehlo", "weights.npz", "export.json"
PLATFORMS = ("cpu", "cuda", "tpu")
CODES, SCALE = "#codes", "#scale"  # suffixes of a packed kernel's two arrays in the weights file
LOADING = ("exported = jax.export.deserialize(bytearray(open('model.stablehlo', 'rb').read())); "
           "logits = exported.call(dict(numpy.load('weights.npz')), images)")


def _name(path) -> str:
    return "/".join(path_names(path))


def _unpacked(stream, scale, bits: int, shape, dtype):
    """A kernel from its packed offset codes (b bits each, most significant first) and scales, in the program."""
    count = math.prod(shape)
    planes = (stream[:, None] >> jnp.arange(7, -1, -1, dtype=jnp.uint8)) & 1
    planes = planes.reshape(-1)[:count * bits].reshape(count, bits).astype(jnp.int32)
    offset = jnp.sum(planes << jnp.arange(bits - 1, -1, -1, dtype=jnp.int32), axis=1)
    return codes_from_offsets(offset, bits).astype(dtype).reshape(shape) * scale.astype(dtype)


def _weights(variables, widths) -> dict:
    """The weights file's arrays: float leaves as they are, quantized kernels as packed codes and scales."""
    quantized = quantized_kernels(variables, tuple(widths.items())) if widths else {}
    arrays = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        names = path_names(path)
        if names in widths:
            arrays[_name(path) + CODES], arrays[_name(path) + SCALE] = packed_kernel(*quantized[names], widths[names])
        else:
            arrays[_name(path)] = np.asarray(leaf)
    return arrays


def _program(module, variables, widths):
    """`run(weights, images) -> logits`: the network's inference pass on the weights file's arrays."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)

    def leaf(weights, path, like):
        names = path_names(path)
        if names not in widths:
            return weights[_name(path)]
        return _unpacked(weights[_name(path) + CODES], weights[_name(path) + SCALE], widths[names], like.shape,
                         like.dtype)

    def run(weights, images):
        restored = jax.tree.unflatten(treedef, [leaf(weights, path, like) for path, like in flat])
        return module.apply(restored, images, train=False)

    return run


def _base(module: nn.Module) -> tuple[nn.Module, dict]:
    """(the module that runs the network, kernel path -> bits): a `Quantized` network runs its own module on its
    dequantized kernels."""
    if isinstance(module, Quantized):
        return module.module, dict(freeze_bits(module.bits))
    return module, {}


def export_network(module: nn.Module, variables, input_shape, out, fold: bool = True) -> dict:
    """Write (module, variables) to the new directory `out` as a portable artifact for images of `input_shape`
    (one image, e.g. (28, 28, 1)), any batch size; returns the description written to export.json.

    With `fold`, every BatchNorm that follows a convolution or dense layer alone is folded into it (inference is
    faster, outputs equal to float rounding); a quantized network is never folded: its kernels must stay on
    their b-bit grids."""
    if not isinstance(module, nn.Module):
        raise InputShapeError(f"export_network takes a flax.linen.Module, got {type(module).__name__}")
    if len(input_shape) < 1 or not all(isinstance(size, int) and size > 0 for size in input_shape):
        raise InputShapeError(f"input shape {tuple(input_shape)} is not one image's shape; give positive sizes, "
                              "e.g. (28, 28, 1)")
    runner, widths = _base(module)
    folded = fold and not widths
    if folded:
        runner, variables = fold_batchnorm(trace(runner, variables, tuple(input_shape)), variables)
    weights = _weights(variables, widths)
    images = jax.ShapeDtypeStruct((*jax.export.symbolic_shape("batch"), *input_shape), jnp.float32)
    try:
        exported = jax.export.export(jax.jit(_program(runner, variables, widths)), platforms=PLATFORMS)(
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), weights), images)
    except Exception as error:  # any failure to trace or lower: say which network and shape
        raise InputShapeError(f"cannot export the network for images of shape {tuple(input_shape)} "
                              f"({type(error).__name__}: {str(error).splitlines()[0]:.200}); check the input shape") \
            from error
    description = {"input_shape": list(input_shape), "input_dtype": "float32", "batch": "any (symbolic)",
                   "output_shape": [str(size) for size in exported.out_avals[0].shape],
                   "platforms": list(exported.platforms), "quantized_kernels": len(widths),
                   "folded_batchnorms": len(runner.norms) if folded else 0,
                   "weights_bytes": int(sum(array.nbytes for array in weights.values())), "load": LOADING}
    with checkpoint.new_directory(out) as partial:
        (partial / PROGRAM).write_bytes(exported.serialize())
        with open(partial / WEIGHTS, "wb") as file:
            np.savez(file, **weights)
        description["sha256"] = {name: _sha256(partial / name) for name in (PROGRAM, WEIGHTS)}
        (partial / DESCRIPTION).write_text(json.dumps(description, indent=1) + "\n")
    return description


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_exported(path):
    """`predict(images) -> logits` of the artifact in `path`; needs only jax and numpy, never the network's code. Its
    files are checked against the checksums export.json holds: an artifact without them is refused (a changed bit
    of its program would fail only when called, or compute other numbers)."""
    path = Path(path)
    try:
        expected = json.loads((path / DESCRIPTION).read_text()).get("sha256")
        if not isinstance(expected, dict) or not {PROGRAM, WEIGHTS} <= set(expected):
            raise ValueError(f"{DESCRIPTION} holds no SHA-256 of {PROGRAM} and {WEIGHTS}, so they cannot be verified")
        changed = [name for name, digest in expected.items() if _sha256(path / name) != digest]
        if changed:
            raise ValueError(f"{changed[0]} is not the file that was exported (SHA-256 differs)")
        exported = jax.export.deserialize(bytearray((path / PROGRAM).read_bytes()))
        with np.load(path / WEIGHTS) as stored:
            weights = {key: stored[key] for key in stored.files}
        (wanted, _), _ = jax.tree.unflatten(exported.in_tree, [(a.shape, str(a.dtype)) for a in exported.in_avals])
        if wanted != {key: (value.shape, str(value.dtype)) for key, value in weights.items()}:
            raise ValueError("its weights do not fit its program")
    except Exception as error:  # a damaged zip, JSON or serialized program raises many kinds
        line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{path} holds no readable exported network ({type(error).__name__}: {line:.200}); "
                              "export it again with `agmc export`") from error
    return lambda images: exported.call(weights, images)
