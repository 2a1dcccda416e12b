"""`agmc export`: a jax.export artifact that a fresh process runs with jax and numpy only, for a slim network and
a quantized one (packed codes unpacked by the program), at any batch size."""
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from agmc_jax.data import load_arrays
from agmc_jax.models import create_model, init_model
from agmc_jax.networks import final_network, load_network
from agmc_jax.portable import export_network
from agmc_jax.quant import Quantized, quantized_variables
from test_cli import BASELINE, run, snapshot

LOADER = """
import sys
import jax, numpy
exported = jax.export.deserialize(bytearray(open(sys.argv[1] + '/model.stablehlo', 'rb').read()))
weights = dict(numpy.load(sys.argv[1] + '/weights.npz'))
images = numpy.load(sys.argv[2])
numpy.save(sys.argv[3], numpy.asarray(exported.call(weights, images)))
assert not [name for name in sys.modules if name.startswith(('agmc_jax', 'flax'))], 'imported the network code'
"""


def outputs_in_a_fresh_process(artifact, images, tmp_path):
    """Logits of the artifact for `images`, computed by a new interpreter that never imports agmc_jax or flax."""
    np.save(tmp_path / "images.npy", images)
    subprocess.run([sys.executable, "-c", LOADER, str(artifact), str(tmp_path / "images.npy"),
                    str(tmp_path / "logits.npy")], check=True, capture_output=True, cwd=tmp_path)
    return np.load(tmp_path / "logits.npy")


@pytest.fixture(scope="module")
def images():
    return load_arrays("fashion_mnist", "validation", limit=7)[0]


def test_slim_network_runs_without_its_code_at_any_batch_size(capsys, tmp_path, images):
    assert run(capsys, "prune", "--workdir", str(BASELINE), "--keep", "0.5", "--out", str(tmp_path / "p"))[0] == 0
    status, out, _ = run(capsys, "export", str(tmp_path / "p"), "--out", str(tmp_path / "e"))
    assert status == 0 and json.loads(out)["output_shape"] == ["batch", "10"]
    module, variables, _ = load_network(tmp_path / "p")
    for count in (7, 2):
        expected = module.apply(variables, images[:count], train=False)
        got = outputs_in_a_fresh_process(tmp_path / "e", images[:count], tmp_path)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_is_folded_into_the_convolutions_with_the_same_outputs(tmp_path, images):
    module = create_model("resnet20", num_classes=10)
    variables = init_model(module, (28, 28, 1))
    rng = np.random.default_rng(0)
    stats = {"mean": lambda v: 0.3 * rng.standard_normal(v.shape), "var": lambda v: rng.uniform(0.5, 2.0, v.shape)}
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: stats[path[-1].key](v).astype(v.dtype) if path[0].key == "batch_stats" else v, variables)
    description = export_network(module, variables, (28, 28, 1), tmp_path / "r")
    assert description["folded_batchnorms"] == len(jax.tree.leaves(variables["batch_stats"])) // 2 > 0
    assert not [key for key in np.load(tmp_path / "r" / "weights.npz").files if key.startswith("batch_stats")]
    np.testing.assert_allclose(outputs_in_a_fresh_process(tmp_path / "r", images[:3], tmp_path),
                               module.apply(variables, images[:3], train=False), rtol=1e-4, atol=1e-4)


def test_quantized_network_stores_packed_codes_and_computes_as_fake_quantization(tmp_path, images):
    module, variables, config = load_network(BASELINE)
    kernels = [path for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0] if leaf.ndim >= 2]
    bits = {("params", *(key.key for key in path)): width for path, width in zip(kernels, [2, 3, 5, 8, 1])}
    quantized = Quantized(module, bits)
    description = export_network(quantized, variables, tuple(config["input_shape"]), tmp_path / "q")
    leaves = {tuple(key.key for key in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    expected_bytes = sum(math.ceil(bits[path] * leaf.size / 8) + 4 * leaf.shape[-1] if path in bits else 4 * leaf.size
                         for path, leaf in leaves.items())
    assert description["weights_bytes"] == expected_bytes and description["quantized_kernels"] == 5
    expected = module.apply(quantized_variables(variables, bits), images, train=False)
    np.testing.assert_allclose(outputs_in_a_fresh_process(tmp_path / "q", images, tmp_path), expected,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quantized.apply(variables, images, train=False), expected, rtol=1e-6, atol=1e-6)


def test_a_compress_output_exports_its_last_stage(tmp_path):
    for stage in ("search/slim", "search/finetune", "quantize/qat"):
        (tmp_path / stage).mkdir(parents=True)
        (tmp_path / stage / "network.json").write_text("{}")
        assert final_network(tmp_path) == tmp_path / stage
    assert final_network(tmp_path / "search") == tmp_path / "search" / "finetune"


@pytest.mark.parametrize("argv, words", [
    (("export", "{tmp}/empty", "--out", "{tmp}/e"), "holds no network"),
    (("export", str(BASELINE), "--out", "{tmp}/full"), "already exists"),
])
def test_bad_export_is_one_line_and_exit_status_2_and_changes_nothing(capsys, tmp_path, argv, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("keep me")
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    before = snapshot(tmp_path, BASELINE)
    status, _, err = run(capsys, *argv)
    assert status == 2 and len(err.splitlines()) == 1 and words in err, err
    assert snapshot(tmp_path, BASELINE) == before and not Path(tmp_path / "e").exists()


@pytest.mark.parametrize("damage, words", [
    ("flip", "weights.npz is not the file that was exported"),
    ("flip_program", "model.stablehlo is not the file that was exported"),
    ("unverified", "export.json holds no SHA-256 of model.stablehlo and weights.npz"),
])
def test_a_damaged_artifact_is_refused_at_load(tmp_path, damage, words):
    """Changed bytes (the checksums export.json holds), and an artifact without checksums (here with a changed
    program: a runtime error when called, before), are a CheckpointError when loading, never an error at call time."""
    from agmc_jax.errors import CheckpointError
    from agmc_jax.portable import load_exported

    module, variables, _ = load_network(BASELINE)
    out = tmp_path / "e"
    export_network(module, variables, (28, 28, 1), out)
    victim = out / ("weights.npz" if damage == "flip" else "model.stablehlo")
    content = bytearray(victim.read_bytes())
    content[len(content) // 2] ^= 0xFF
    victim.write_bytes(bytes(content))
    if damage == "unverified":
        description = json.loads((out / "export.json").read_text())
        del description["sha256"]  # an artifact without checksums: the reader must still refuse it
        (out / "export.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=words) as error:
        load_exported(out)
    assert "\n" not in str(error.value)
