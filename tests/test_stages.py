"""`agmc compress --stages`: the quantize stage end to end (bit search, QAT, packed file), and its bad input."""
import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from agmc_jax.data import load_arrays
from agmc_jax.graph import trace
from agmc_jax.networks import load_network
from agmc_jax.quant import Quantized, load_packed, quantize, size_bits, size_model
from agmc_jax.quant.qat import path_names
from tests.test_cli import run

BASELINE = Path(__file__).parents[1] / "agmc_jax" / "baselines" / "lenet5_fashion_mnist"
QUANTIZE = ["compress", "--workdir", str(BASELINE), "--stages", "quantize", "--quant-method", "random",
            "--episodes", "4", "--reward-images", "64", "--qat-epochs", "1", "--target-size", "0.2"]


def test_quantize_stage_reports_the_packed_file_it_wrote(capsys, tmp_path):
    """Bits within 2..8 (first and last at 8), the file's size on disk is the report's and meets the budget's
    payload, and the packed file reloads into the fine-tuned network: same outputs, codes on the bit grid."""
    out = tmp_path / "c"
    status, _, err = run(capsys, *QUANTIZE, "--out", str(out))
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    quant = report["quantize"]
    bits = list(quant["bits"].values())
    assert bits[0] == bits[-1] == 8 and all(2 <= b <= 8 for b in bits)
    packed = out / "quantize" / "model.packed"
    assert packed.stat().st_size == quant["size_bytes"]["packed"]
    module, variables, config = load_network(out / "quantize" / "qat")
    assert isinstance(module, Quantized)
    net = trace(module.module, variables, tuple(config["input_shape"]))
    leaves = [net.paths.index(layer.kernel_path) for layer in net.layers]
    payload = size_bits(size_model(net.shapes, leaves, {}), bits) / 8
    assert payload <= 0.2 * quant["size_bytes"]["float32"] and payload < packed.stat().st_size < payload + 4096
    restored = load_packed(packed, variables)
    images = load_arrays("fashion_mnist", "test", limit=32)[0]
    np.testing.assert_allclose(module.module.apply(restored, images, train=False),
                               module.apply(variables, images, train=False), atol=1e-5)
    flat = {path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}
    for layer, width in zip(net.layers, bits):
        kernel = np.asarray(flat[layer.kernel_path])
        codes, scale = quantize(kernel, width)
        np.testing.assert_allclose(np.asarray(codes) * np.asarray(scale), kernel, rtol=1e-6, atol=1e-7)
    assert "## Quantized: random" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (("--stages", "prune,squeeze"), "--stages"),
    (("--stages", "quantize,quantize"), "--stages"),
    (("--min-bit", "9", "--max-bit", "3"), "--min-bit 9"),
    (("--max-bit", "17"), "--max-bit"),
    (("--target-size", "0.001"), "below what any network reaches with weights of --min-bit 2"),
    (("--target-size", "0.07"), "min_bit=2"),  # above 2/32, below what LeNet-5 reaches
    (("--quant-method", "nope"), "unknown method"),
])
def test_bad_stage_options_are_one_line_before_any_work(capsys, tmp_path, argv, words):
    """One line, exit status 2, nothing written: checked before the baseline is even evaluated."""
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in BASELINE.rglob("*") if p.is_file()}
    status, _, err = run(capsys, *QUANTIZE, "--out", str(tmp_path / "c"), *argv)
    assert status == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "c").exists()
    assert {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in BASELINE.rglob("*") if p.is_file()} == before


def test_a_size_budget_only_the_pruned_network_misses_is_refused_before_the_prune_fine_tune(capsys, tmp_path):
    """LeNet-5 reaches 7.3% of its float32 size at 2 bits, the network pruned to half its MACs 7.9% (its pinned
    8-bit layers weigh more): --target-size 0.076 passes the checks on the input and is refused in one line as soon
    as the search has fixed the pruned shapes, before the prune stage's fine-tune starts."""
    out = tmp_path / "c"
    status, _, err = run(capsys, "compress", "--workdir", str(BASELINE), "--out", str(out), "--stages",
                         "prune,quantize", "--method", "uniform", "--target-macs", "0.5", "--target-size", "0.076",
                         "--reward-images", "64", "--criterion", "l2")  # l2: no refit to warn about 64 images
    assert status == 2 and len(err.splitlines()) == 1 and "below what min_bit=2 allows (0.079" in err, err
    assert (out / "search" / "slim").is_dir() and not (out / "search" / "finetune").exists()
