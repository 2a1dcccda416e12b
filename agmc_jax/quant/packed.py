"""Packed export: quantized kernels as densely packed b-bit integer codes with float32 per-channel scales.

One file: `MAGIC`, the header's length (uint32, little endian), the header (JSON: each leaf's path, shape,
dtype and bits, and a fingerprint of the tree), then each leaf's bytes in header order. A kernel of b bits
stores its codes offset to [0, 2^b - 2] (one bit: 0 for -1, 1 for +1), b bits each, most significant
first, in ceil(b * n / 8) bytes, then its per-output-channel scales as float32; every other leaf stores its
values as float32. Nothing else is written, so the file's size on disk is the network's packed size.
"""
import hashlib
import json
import math
import struct
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.errors import CheckpointError
from agmc_jax.quant.fake import quantize
from agmc_jax.quant.qat import MAX_BITS, MIN_BITS, freeze_bits, map_kernels, path_names

MAGIC = b"AGMCPAK1"
_PREFIX = struct.Struct("<I")  # the header's length
_CHUNK = 1 << 20  # values packed at once: a multiple of 8, so every chunk fills whole bytes


def _top(bits: int) -> int:
    """The largest code of a b-bit quantizer (as `fake.levels`)."""
    return max(2 ** (bits - 1) - 1, 1)


def pack_codes(values, bits: int) -> bytes:
    """Unsigned integers below 2^bits, `bits` bits each, most significant bit first, in ceil(bits * n / 8) bytes."""
    values = np.asarray(values).reshape(-1).astype(">u2")
    planes = (np.unpackbits(values[start:start + _CHUNK].view(np.uint8)).reshape(-1, 16)[:, 16 - bits:]
              for start in range(0, values.size, _CHUNK))
    return b"".join(np.packbits(chunk).tobytes() for chunk in planes)


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """The `count` unsigned integers of `bits` bits each that `pack_codes` wrote into `data` (int64)."""
    step = _CHUNK * bits // 8
    parts = []
    for start in range(0, count, _CHUNK):
        size = min(_CHUNK, count - start)
        planes = np.unpackbits(np.frombuffer(data, np.uint8, count=math.ceil(size * bits / 8),
                                             offset=start // _CHUNK * step), count=size * bits).reshape(size, bits)
        padded = np.concatenate([np.zeros((size, 16 - bits), np.uint8), planes], axis=1)
        parts.append(np.packbits(padded, axis=1).view(">u2").reshape(-1))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _entries(variables, widths) -> list:
    """The header's description of each leaf (arrays or shape/dtype structs): path, shape, dtype and bits (None
    for float32 leaves)."""
    return [{"path": list(path_names(path)), "shape": [int(size) for size in leaf.shape],
             "dtype": str(jnp.dtype(leaf.dtype)), "bits": widths.get(path_names(path))}
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]]


def _fingerprint(entries) -> str:
    """A hash of the tree's paths, shapes and dtypes: which network a file belongs to."""
    layout = [[entry["path"], entry["shape"], entry["dtype"]] for entry in entries]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def _nbytes(entry) -> int:
    """The bytes a leaf takes in the file."""
    count = math.prod(entry["shape"])
    if entry["bits"] is None:
        return 4 * count
    return math.ceil(entry["bits"] * count / 8) + 4 * entry["shape"][-1]


@partial(jax.jit, static_argnums=1)
def _quantized_kernels(variables, bits):
    """{kernel path: (codes, scale)} for frozen `bits`, in one compiled program (as the network computes them)."""
    leaves = {path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    return {path: quantize(leaves[path], width) for path, width in bits}


def packed_kernel(codes, scale, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A kernel's (codes, scale) of `quantize` as stored: its codes offset to [0, 2^b - 2] (one bit: 0 for -1,
    1 for +1), packed b bits each (uint8), and its float32 per-channel scales."""
    offset = np.asarray(codes) + _top(bits) if bits > 1 else (np.asarray(codes) + 1) // 2
    return np.frombuffer(pack_codes(offset, bits), np.uint8), np.asarray(scale, "<f4")


def _encode(leaf, bits, quantized) -> bytes:
    """A leaf's bytes: packed offset codes and float32 scales for a kernel, float32 values otherwise."""
    if bits is None:
        return np.asarray(leaf).astype("<f4").tobytes()
    return b"".join(part.tobytes() for part in packed_kernel(*quantized, bits))


def quantized_kernels(variables, bits) -> dict:
    """{kernel path: (codes, scale)} on the host for the kernels named in `bits`, as the network computes them."""
    return jax.device_get(_quantized_kernels(variables, freeze_bits(bits)))


def codes_from_offsets(offset, bits: int):
    """The signed codes of `packed_kernel`'s offset codes (NumPy or jax.numpy integers)."""
    return offset - _top(bits) if bits > 1 else 2 * offset - 1


def _decode(data: bytes, entry) -> np.ndarray:
    """The (dequantized) array of a leaf from its bytes."""
    shape, bits, dtype = tuple(entry["shape"]), entry["bits"], jnp.dtype(entry["dtype"])
    if bits is None:
        return np.frombuffer(data, "<f4").reshape(shape).astype(dtype)
    count, packed = math.prod(shape), math.ceil(bits * math.prod(shape) / 8)
    offset = unpack_codes(data[:packed], bits, count)
    codes = codes_from_offsets(offset, bits).astype(np.float32).reshape(shape)
    return (codes * np.frombuffer(data[packed:], "<f4")).astype(dtype)


def save_packed(path, variables, bits, overwrite: bool = False) -> int:
    """Write `variables` with the kernels named in `bits` (kernel path -> width in 1..16) packed to the new file
    `path` (an existing one only with `overwrite`); returns the bytes written, the file's size."""
    frozen = freeze_bits(bits)
    map_kernels(lambda kernel, width: kernel, variables, frozen)
    widths = dict(frozen)
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose a new path or allow overwriting")
    entries = _entries(variables, widths)
    header = json.dumps({"fingerprint": _fingerprint(entries), "leaves": entries}, separators=(",", ":")).encode()
    quantized = quantized_kernels(variables, frozen)
    data = b"".join([MAGIC, _PREFIX.pack(len(header)), header,
                     *(_encode(leaf, entry["bits"], quantized.get(tuple(entry["path"])))
                       for leaf, entry in zip(jax.tree.leaves(variables), entries))])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb" if overwrite else "xb") as file:
        file.write(data)
    return len(data)


def _corrupt(path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a packed network or is corrupt ({detail}); export it again")


def _valid_bits(entry) -> bool:
    """Whether a header entry's bits are None or a width in 1..16 on a leaf of rank 2 or more."""
    bits = entry["bits"]
    return bits is None or (type(bits) is int and MIN_BITS <= bits <= MAX_BITS and len(entry["shape"]) >= 2)


def _read(path) -> tuple[dict, bytes, int]:
    """(header, file bytes, offset of the first leaf) of a packed file, checked against the file's size."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read packed file {path} ({error.strerror}); fix the path") from error
    start = len(MAGIC) + _PREFIX.size
    if len(data) < start or not data.startswith(MAGIC):
        raise _corrupt(path, "no packed-network signature")
    end = start + _PREFIX.unpack_from(data, len(MAGIC))[0]
    try:
        header = json.loads(data[start:end])
        entries = header["leaves"]
        consistent = header["fingerprint"] == _fingerprint(entries) and all(map(_valid_bits, entries))
        expected = end + sum(_nbytes(entry) for entry in entries)
    except (ValueError, KeyError, TypeError) as error:
        raise _corrupt(path, f"unreadable header: {type(error).__name__}") from error
    if not consistent:
        raise _corrupt(path, "the header contradicts itself")
    if len(data) != expected:
        raise _corrupt(path, f"{len(data)} bytes where the header describes {expected}")
    return header, data, end


def _difference(entries, like_entries) -> str:
    """The first leaf in which a file's tree differs from the network's, in words."""
    for ours, theirs in zip(entries, like_entries):
        if ours["path"] != theirs["path"]:
            return f"it has {'/'.join(ours['path'])} where the network has {'/'.join(theirs['path'])}"
        if (ours["shape"], ours["dtype"]) != (theirs["shape"], theirs["dtype"]):
            return (f"{'/'.join(ours['path'])} is {ours['dtype']}{ours['shape']} there but "
                    f"{theirs['dtype']}{theirs['shape']} in the network")
    return f"it has {len(entries)} variables, the network {len(like_entries)}"


def load_packed(path, like_variables):
    """The variables stored in the packed file `path`, dequantized (codes times scales), in the tree of
    `like_variables` (arrays or shape/dtype structs of the network the file was exported from)."""
    header, data, end = _read(path)
    like = _entries(like_variables, {})
    if header["fingerprint"] != _fingerprint(like):
        raise CheckpointError(f"{path} belongs to another network ({_difference(header['leaves'], like)}); "
                              "load it into the network it was exported from")
    leaves = []
    for entry in header["leaves"]:
        size = _nbytes(entry)
        leaves.append(_decode(data[end:end + size], entry))
        end += size
    return jax.tree.unflatten(jax.tree.structure(like_variables), leaves)
