"""Quantization-aware training and the packed export, against NumPy references and hand computations.

The contract: `Quantized(module, bits)` computes what `module` computes on weights quantized in NumPy
(codes round(w / scale) clipped to +-(2^(b-1) - 1), scale max|w| / (2^(b-1) - 1) per output channel;
one bit: sign times mean|w|), its gradient is the straight-through one, training keeps the weights it
computes with on their grids, and the packed file is exactly as large as its parts and reloads to the same
outputs.
"""
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmc_jax.errors import AgmcError, CheckpointError, QuantizationError
from agmc_jax.graph import trace
from agmc_jax.models import create_model, init_model
from agmc_jax.networks import evaluate_variables, load_network, mark_trained_quantized, save_quantized
from agmc_jax.prune import Slimmed, channel_masks, slim
from agmc_jax.quant import (Quantized, channel_scale, fake_quantize, freeze_bits, levels, load_packed, quantized_variables, save_packed)
from agmc_jax.quant import packed
from agmc_jax.train import config_to_dict, load_trained, resolve_config, train
from realistic import realistic
from test_train import CONFIG, SOURCES

# Compiling whole networks dominates these tests; XLA's cheapest CPU pipeline halves it.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
LENET = (create_model("lenet5", 10), (28, 28, 1))
RESNET = (create_model(CONFIG.model, 10, **CONFIG.model_kwargs), CONFIG.input_shape)  # BatchNorm, residuals


def _variables(module, shape, seed=0):
    return realistic(jax.eval_shape(lambda: init_model(module, shape)), seed)


def _kernels(variables):
    return [path for path, leaf in _flat(variables).items() if path[-1] == "kernel"]


def _names(path):
    return tuple(k.key for k in path)


def _flat(variables):
    return {_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}


def _bits(variables, widths):
    """Kernel path -> width, the widths taken in turn over the kernels in tree order."""
    return {path: widths[i % len(widths)] for i, path in enumerate(_kernels(variables))}


def numpy_quantize(w, bits):
    """(codes, per-output-channel scale) in NumPy float32, from the definition."""
    w = np.asarray(w, np.float32)
    axes = tuple(range(w.ndim - 1))
    if bits == 1:
        return np.where(w >= 0, 1.0, -1.0).astype(np.float32), np.mean(np.abs(w), axis=axes)
    top = np.float32(2 ** (bits - 1) - 1)
    scale = np.max(np.abs(w), axis=axes) / top
    return np.clip(np.round(w / scale), -top, top), scale


def numpy_quantized(variables, bits):
    """`variables` with the kernels in `bits` replaced by codes * scale (NumPy)."""
    def visit(path, leaf):
        names = _names(path)
        if names not in bits:
            return np.asarray(leaf)
        codes, scale = numpy_quantize(leaf, bits[names])
        return codes * scale
    return jax.tree_util.tree_map_with_path(visit, variables)


@functools.partial(jax.jit, static_argnames=("module", "train", "mutable"), compiler_options=FAST)
def _apply(module, variables, x, train=False, mutable=False):
    """`module.apply` compiled once per module (eager Linen compiles every operation apart, which is slower)."""
    return module.apply(variables, x, train=train, mutable=mutable)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), (4, *shape))


# ----- the straight-through estimator ------------------------------------------------------------
def test_straight_through_gradient_by_hand():
    """3 bits, scale 0.5: codes clip at +-3, so the clipping range is [-1.5, 1.5]; the gradient of the rounding
    is 1 inside it and 0 outside."""
    w = jnp.array([[0.1, 0.3, -0.7, 1.4, 1.5, 2.0, -3.0]]).T  # one output channel
    scale = jnp.array([0.5])
    np.testing.assert_array_equal(fake_quantize(w, 3, scale)[:, 0], [0.0, 0.5, -0.5, 1.5, 1.5, 1.5, -1.5])
    weights = jnp.arange(1.0, 8.0)[:, None]
    gradient = jax.grad(lambda w: jnp.sum(weights * fake_quantize(w, 3, scale)))(w)
    np.testing.assert_array_equal(gradient[:, 0], [1, 2, 3, 4, 5, 0, 0])


def test_module_gradient_is_the_straight_through_one():
    """Through `Quantized`, a kernel's gradient is the base network's gradient at the quantized weights, masked to
    the clipping range |w| <= levels * scale (one bit: |w| <= mean|w|, which cuts many); other leaves get the base's
    gradient. (The range is fake.py's, computed in JAX: its division can differ from NumPy's in the last bit.)"""
    module, shape = LENET
    variables = _variables(module, shape)
    bits = _bits(variables, (1, 3, 8))
    x, labels = _x(shape), jnp.arange(4)

    def loss(apply_module, params):
        logits = apply_module.apply({"params": params}, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    gradient = lambda m: jax.jit(jax.grad(functools.partial(loss, m)), compiler_options=FAST)  # noqa: E731
    got = _flat(gradient(Quantized(module, bits))(variables["params"]))
    base = _flat(gradient(module)(numpy_quantized(variables, bits)["params"]))
    flat = _flat(variables)
    for path, gradient in got.items():
        expected = base[path]
        width = bits.get(("params", *path))
        if width:
            w = flat[("params", *path)]
            inside = np.abs(w / np.asarray(channel_scale(w, width))) <= float(levels(width)) * (1 + 1e-6)
            assert width > 1 or 0.2 < inside.mean() < 0.9
            expected = expected * inside
        np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6, err_msg=str(path))


# ----- the quantized forward pass -----------------------------------------------------------------
@pytest.mark.parametrize("network", ["lenet", "resnet", "slim lenet"])
def test_quantized_network_computes_on_numpy_quantized_weights(network):
    """Outputs (and, training, BatchNorm statistics) equal the base module's on weights quantized in NumPy; the
    variable tree is the base's: `init` of the wrapper gives the base's tree."""
    module, shape = RESNET if network == "resnet" else LENET
    variables = _variables(module, shape)
    if network == "slim lenet":
        net = trace(module, variables, shape)
        module, variables = slim(net, variables, channel_masks(net, variables, 0.5))
        assert isinstance(module, Slimmed)
    bits = _bits(variables, (2, 3, 5, 7, 8, 1))
    quantized, x = Quantized(module, bits), _x(shape)
    expected = numpy_quantized(variables, bits)
    train = network == "resnet"  # BatchNorm on batch statistics, which it updates
    mutable = ("batch_stats",) if train else False
    out = _apply(quantized, variables, x, train=train, mutable=mutable)
    reference = _apply(module, expected, x, train=train, mutable=mutable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out, reference)
    if train:
        assert out[1]["batch_stats"]
        initialised = jax.eval_shape(lambda: quantized.init(jax.random.key(0), x, train=False))
        assert jax.tree.structure(initialised) == jax.tree.structure(variables)


# ----- quantization-aware fine-tuning -------------------------------------------------------------
@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    """A small ResNet-20 fine-tuned 1 epoch (4 steps) by `train` as `Quantized`, marked as a quantized workdir."""
    module, shape = RESNET
    config = dataclasses.replace(resolve_config(CONFIG), epochs=1, learning_rate=0.05)
    start = jax.device_get(init_model(module, shape, 0))  # train donates its arrays
    bits = _bits(start, (1, 3, 4, 5, 6, 7, 8, 12))
    workdir = tmp_path_factory.mktemp("qat")
    summary = train(config, workdir, SOURCES, module=Quantized(module, bits), variables=start)
    mark_trained_quantized(workdir, config_to_dict(config), bits, False)
    return workdir, start, bits, summary, config


def test_fine_tuned_network_stays_on_its_bit_grid(qat, tmp_path):
    """After training, the stored (latent) kernels have moved and what the network computes with is on their grids:
    integer codes in [-(2^(b-1) - 1), 2^(b-1) - 1] times one scale per output channel, at most 2^b - 1 values per
    channel (one bit: +-scale), as NumPy quantizes the latent kernels; the packed export stores exactly these."""
    workdir, start, bits, _, _ = qat
    module, variables, _ = load_trained(workdir)
    flat, before = _flat(variables), _flat(start)
    effective = _flat(_effective(variables, freeze_bits(bits)))
    for path, width in bits.items():
        assert not np.allclose(flat[path], before[path]), path
        codes, scale = numpy_quantize(flat[path], width)
        assert np.abs(codes).max() == max(2 ** (width - 1) - 1, 1)
        np.testing.assert_allclose(effective[path], codes * scale, rtol=1e-6, atol=0, err_msg=str(path))
        steps = np.asarray(effective[path]) / scale
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4, err_msg=str(path))
        assert max(np.unique(channel).size for channel in np.moveaxis(steps, -1, 0)) <= max(2 ** width - 1, 2)
    _check_packed(tmp_path / "net.packed", module, variables, bits, _x(RESNET[1]))


def test_quantized_workdir_and_directory_reload(qat, tmp_path):
    """A fine-tuned quantized workdir and a saved quantized directory load as `Quantized` networks that score what
    training measured; the directory's packed file is the size reported."""
    workdir, _, bits, summary, config = qat
    module, variables, config_dict = load_network(workdir)
    assert isinstance(module, Quantized) and dict(module.bits) == bits
    score = evaluate_variables(module, variables, config_dict, source=SOURCES["test"], batch_size=CONFIG.batch_size)
    assert score["accuracy"] == summary["test_acc"]
    size = save_quantized(tmp_path / "q", config_dict, variables, bits, False, {"source": str(workdir)})
    assert size == (tmp_path / "q" / "model.packed").stat().st_size
    assert json.loads((tmp_path / "q" / "network.json").read_text())["packed_bytes"] == size
    reloaded, reloaded_variables, _ = load_network(tmp_path / "q")
    assert reloaded == module
    x = _x(RESNET[1])
    np.testing.assert_array_equal(_apply(reloaded, reloaded_variables, x, train=False),
                                  _apply(module, variables, x, train=False))
    with pytest.raises(CheckpointError):
        save_quantized(tmp_path / "q", config_dict, variables, bits, False, {})


# ----- the packed export --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=1)
def _effective(variables, bits):
    return quantized_variables(variables, bits)


def _check_packed(path, module, variables, bits, x):
    """Save, check the file's size against its parts, reload: the kernels are exactly the quantized network's
    weights, the other leaves the float32 ones, and the outputs the quantized network's."""
    written = save_packed(path, variables, bits)
    raw = path.read_bytes()
    header = 12 + int.from_bytes(raw[8:12], "little")
    expected = header + sum(math.ceil(bits[p] * leaf.size / 8) + 4 * leaf.shape[-1] if p in bits else 4 * leaf.size
                            for p, leaf in _flat(variables).items())
    assert written == path.stat().st_size == expected
    assert header < 200 * len(_flat(variables))
    loaded = load_packed(path, jax.eval_shape(lambda: variables))
    effective = _flat(_effective(variables, freeze_bits(bits)))
    for p, leaf in _flat(loaded).items():
        np.testing.assert_array_equal(leaf, effective[p], err_msg=str(p))
    np.testing.assert_allclose(_apply(module, loaded, x, train=False),
                               _apply(Quantized(module, bits), variables, x, train=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [1, 13, 37])
def test_codes_packed_densely_most_significant_bit_first(count, monkeypatch):
    """Every width 1..16: the bytes are the codes' binary digits concatenated (zero-padded to a byte), also across
    the chunks the packer works in; unpacking gives the codes back."""
    monkeypatch.setattr(packed, "_CHUNK", 16)
    rng = np.random.default_rng(count)
    for bits in range(1, 17):
        values = rng.integers(0, 2 ** bits, count)
        digits = "".join(format(int(v), f"0{bits}b") for v in values)
        digits += "0" * (-len(digits) % 8)
        expected = bytes(int(digits[i:i + 8], 2) for i in range(0, len(digits), 8))
        assert packed.pack_codes(values, bits) == expected
        np.testing.assert_array_equal(packed.unpack_codes(expected, bits, count), values)


def test_packed_file_size_and_reloaded_outputs(tmp_path):
    """LeNet-5 at 3, 5, 7, 2 and 16 bits (the ResNet with BatchNorm: the fine-tuning test); its file is the header
    plus ceil(b * n / 8) bytes of codes and 4 bytes per scale for each quantized kernel, 4 bytes per value for
    everything else; reloaded, it computes what the quantized network does."""
    module, shape = LENET
    variables = _variables(module, shape)
    _check_packed(tmp_path / "net.packed", module, variables, _bits(variables, (3, 5, 7, 2, 16)), _x(shape))


# ----- bad input ----------------------------------------------------------------------------------
def _one_line(error):
    assert isinstance(error.value, AgmcError) and "\n" not in str(error.value) and str(error.value)


@pytest.mark.parametrize("width", [0, 17, 2.5, True, "4"])
def test_bits_outside_1_to_16_are_refused(width, tmp_path):
    module, shape = LENET
    variables = _variables(module, shape)
    bits = {("params", "Conv_0", "kernel"): width}
    for call in (lambda: Quantized(module, bits), lambda: save_packed(tmp_path / "p", variables, bits),
                 lambda: freeze_bits(bits)):
        with pytest.raises(QuantizationError) as error:
            call()
        _one_line(error)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("path", [("params", "Conv_9", "kernel"), ("params", "Conv_0", "bias")])
def test_bits_on_a_leaf_that_is_not_a_kernel_are_refused(path, tmp_path):
    module, shape = LENET
    variables = _variables(module, shape)
    with pytest.raises(QuantizationError) as error:
        jax.eval_shape(Quantized(module, {path: 4}).apply, variables, _x(shape))
    _one_line(error)
    with pytest.raises(QuantizationError):
        save_packed(tmp_path / "p", variables, {path: 4})
    assert not (tmp_path / "p").exists()


def test_packed_file_into_another_network_corrupt_or_existing(tmp_path):
    """Another network (other paths, other shapes), a truncated, altered or foreign file: a one-line
    `CheckpointError`; an existing file is not overwritten unless asked."""
    module, shape = LENET
    variables = _variables(module, shape)
    bits = _bits(variables, (4,))
    path = tmp_path / "lenet.packed"
    size = save_packed(path, variables, bits)
    original = path.read_bytes()
    others = [RESNET, (create_model("lenet5", 5), shape)]
    for other, other_shape in others:
        with pytest.raises(CheckpointError, match="another network") as error:
            load_packed(path, jax.eval_shape(lambda: init_model(other, other_shape)))
        _one_line(error)
    damaged = {"truncated": original[:-3], "extended": original + b"\0", "magic": b"X" + original[1:],
               "header": original[:20] + b"{" + original[21:], "empty": b"",
               "bits": original.replace(b'"bits":4', b'"bits":0', 1)}
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="corrupt") as error:
            load_packed(tmp_path / name, variables)
        _one_line(error)
    with pytest.raises(CheckpointError) as error:
        save_packed(path, _variables(module, shape, seed=1), bits)
    _one_line(error)
    assert path.read_bytes() == original
    assert save_packed(path, _variables(module, shape, seed=1), bits, overwrite=True) == size
    assert path.read_bytes() != original
