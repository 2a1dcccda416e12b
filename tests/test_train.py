"""Training: data parallelism equals one device, resume equals an uninterrupted run, bad checkpoints are refused."""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agmc_jax import checkpoint, data
from agmc_jax.errors import AgmcError, CheckpointError, CheckpointWarning
from agmc_jax.prune.admm import Penalized
from agmc_jax.train import (Hook, TrainConfig, abstract_train_state, build_module, create_train_state, evaluate,
                            evaluate_arrays, global_batch, load_trained, make_train_step, masked_params, optimizer_spec,
                            resolve_config, state_from_variables, train)

ROOT = Path(__file__).resolve().parents[1]
# A ResNet-20 with 4/8/8 channels on 8x8 images: every test shares its compiled init and steps.
CONFIG = TrainConfig("resnet20", "fashion_mnist", epochs=2, batch_size=16, input_shape=(8, 8, 1),
                     model_kwargs={"widths": (4, 8, 8)})
STEPS_PER_EPOCH = 4

# Run in a subprocess with 4 CPU devices: one train step from the state and batch in argv[1], results to argv[2].
MULTI_DEVICE_STEP = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np
from tests.test_train import CONFIG, STEPS_PER_EPOCH
from agmc_jax.train import (abstract_train_state, build_module, data_mesh, global_batch, make_train_step,
                            optimizer_spec, resolve_config)
assert jax.device_count() == 4, jax.devices()
inputs = np.load(sys.argv[1])
config = resolve_config(CONFIG)
module = build_module(config)
leaves = [inputs[f"leaf{i}"] for i in range(len(inputs.files) - 2)]
state = jax.tree.unflatten(jax.tree.structure(abstract_train_state(module, config)), leaves)
mesh = data_mesh()
batch = global_batch({"image": inputs["image"], "label": inputs["label"]}, mesh)
assert len(batch["image"].addressable_shards) == 4
state, _ = make_train_step(mesh, module, optimizer_spec(config, STEPS_PER_EPOCH))(state, batch)
np.savez(sys.argv[2], **{f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})
"""


def _source(size: int, seed: int) -> data.ArraySource:
    """A learnable 10-class problem: class k is a bright row k % 8 (and a dimmer column for k >= 8) on noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size).astype(np.int32)
    images = rng.integers(0, 64, (size, 8, 8, 1)).astype(np.uint8)
    images[np.arange(size), labels % 8, :, 0] = 220
    images[labels >= 8, :, 0, 0] = 160
    return data.ArraySource(images, labels)


SOURCES = {"train": _source(64, 0), "validation": _source(20, 1), "test": _source(30, 2)}


def _snapshot(directory: Path) -> dict:
    """Every file under `directory` with a hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_device_setup():
    """The module, a 'data' mesh over the first device, a fresh replicated state and the compiled train step."""
    config = resolve_config(CONFIG)
    module, mesh = build_module(config), Mesh(np.asarray(jax.devices()[:1]), ("data",))
    state = jax.device_put(create_train_state(module, config.input_shape, config), NamedSharding(mesh, P()))
    return module, mesh, state, make_train_step(mesh, module, optimizer_spec(config, STEPS_PER_EPOCH))


def _batch(seed: int = 3) -> dict:
    """A fixed global batch of 16 normalised training images (no augmentation)."""
    images, labels = SOURCES["train"].get(np.arange(16) + seed)
    return {"image": ((images.astype(np.float32) / 255 - 0.286) / 0.353), "label": labels}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A workdir holding an uninterrupted 2-epoch run, and its final metrics."""
    workdir = tmp_path_factory.mktemp("trained")
    return workdir, train(CONFIG, workdir, SOURCES)


def test_four_devices_match_one_device(tmp_path):
    """One step over a batch split on 4 devices gives the parameters and BatchNorm statistics of one device."""
    module, mesh, state, step = _one_device_setup()
    batch = _batch()
    np.savez(tmp_path / "in.npz", image=batch["image"], label=batch["label"],
             **{f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", MULTI_DEVICE_STEP, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                             cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    one, _ = step(state, global_batch(batch, mesh))
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    four = np.load(tmp_path / "out.npz")
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(one)[0]]
    assert any("batch_stats" in p for p in paths)
    for i, (path, leaf) in enumerate(zip(paths, jax.tree.leaves(one))):
        np.testing.assert_allclose(four[f"leaf{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-5, err_msg=path)


def test_loss_decreases_on_a_learnable_batch():
    """A few SGD steps on one batch lower its loss well below the first step's (which is near log 10)."""
    _, mesh, state, step = _one_device_setup()
    batch = global_batch(_batch(), mesh)
    losses = []
    for _ in range(2 * STEPS_PER_EPOCH):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"] / metrics["count"]))
    assert losses[-1] < 0.6 * losses[0], losses


def test_sparse_training_keeps_pruned_weights_at_zero():
    """With `sparse`, kernel weights that start at zero stay exactly zero while the others keep learning."""
    config = dataclasses.replace(resolve_config(CONFIG), sparse=True)
    module, mesh, state, _ = _one_device_setup()
    pruned = jax.tree.map(lambda p: np.asarray(p) * (np.arange(p.size).reshape(p.shape) % 2 if p.ndim > 1 else 1),
                          state.params)
    state = jax.device_put(state_from_variables({"params": pruned, "batch_stats": state.batch_stats}, config),
                           NamedSharding(mesh, P()))
    step = make_train_step(mesh, module, optimizer_spec(config, STEPS_PER_EPOCH))
    for _ in range(2):
        state, _ = step(state, global_batch(_batch(), mesh))
    for before, after in zip(jax.tree.leaves(pruned), jax.tree.leaves(state.params)):
        after = np.asarray(after)
        if before.ndim > 1:
            assert np.all(after[before == 0] == 0)
            assert np.any(after[before != 0] != before[before != 0])


def _hooked_and_plain(hook, carry, spec):
    """One step of the hooked step (carry `carry`) and one of the plain step with optimizer `spec`, from the same
    state and batch."""
    module, mesh, state, _ = _one_device_setup()
    batch = global_batch(_batch(), mesh)
    plain = make_train_step(mesh, module, spec)
    hooked = make_train_step(mesh, module, optimizer_spec(resolve_config(CONFIG), STEPS_PER_EPOCH), hook=hook)
    return hooked(jax.tree.map(jnp.array, state), batch, carry), plain(state, batch)  # a copy: steps donate


def test_a_mask_hook_is_the_plain_step_then_the_mask():
    """`Hook(params=masked_params)` with masks as its carry gives the plain step's parameters times the masks,
    exactly, and its BatchNorm statistics and metrics."""
    _, _, state, _ = _one_device_setup()
    masks = jax.tree.map(lambda p: (np.arange(p.size).reshape(p.shape) % 3 > 0).astype(np.float32), state.params)
    (hooked, hooked_sums), (plain, plain_sums) = _hooked_and_plain(
        Hook(params=masked_params), masks, optimizer_spec(resolve_config(CONFIG), STEPS_PER_EPOCH))
    for got, want, mask in zip(jax.tree.leaves(hooked.params), jax.tree.leaves(plain.params), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want) * mask)
    chex.assert_trees_all_equal(hooked.batch_stats, plain.batch_stats)
    chex.assert_trees_all_equal(hooked_sums, plain_sums)


def test_a_penalty_hook_on_the_kernels_is_more_weight_decay():
    """A module hook sowing c/2 * (sum of squared kernels, from its carry c) into the loss has the gradient c * w of
    coupled weight decay: one step equals the plain step with weight decay raised by c (worked by hand)."""
    c = 0.25
    kernels = lambda params, c: c / 2 * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params) if p.ndim > 1)  # noqa
    hook = Hook(module=lambda module, carry: Penalized(module, lambda params: kernels(params, carry)))
    spec = optimizer_spec(resolve_config(CONFIG), STEPS_PER_EPOCH)
    (hooked, _), (plain, _) = _hooked_and_plain(hook, jnp.float32(c), spec._replace(weight_decay=spec.weight_decay + c))
    chex.assert_trees_all_close(hooked.params, plain.params, rtol=1e-5, atol=1e-6)


def test_evaluate_arrays_is_numpy_top1_and_cross_entropy():
    """The one evaluator on in-memory arrays (37 images in batches of 16: the last padded and masked) gives the
    accuracy, mean cross-entropy and count computed in NumPy from the network's logits."""
    module, _, state, _ = _one_device_setup()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images, labels = SOURCES["test"].get(np.arange(30))
    images = np.concatenate([images, images[:7]]).astype(np.float32) / 255
    labels = np.concatenate([labels, labels[:7]])
    logits = np.asarray(module.apply(variables, images, train=False), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    losses = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(37), labels]
    got = evaluate_arrays(module, variables, images, labels, batch_size=16)
    assert got["count"] == 37 and got["accuracy"] == np.mean(logits.argmax(-1) == labels)
    np.testing.assert_allclose(got["loss"], losses.mean(), rtol=1e-5)


def test_resumed_run_equals_uninterrupted_run(trained, tmp_path):
    """Stopping after epoch 1 and resuming gives the state, step and metrics of one 2-epoch run; a third call is a no-op."""
    workdir, final = trained
    stopped = train(CONFIG, tmp_path, SOURCES, stop_after=1)
    assert stopped["epoch"] == 1 and "test_acc" not in stopped
    resumed = train(CONFIG, tmp_path, SOURCES)
    assert resumed == {**final, "seconds": resumed["seconds"]}
    assert checkpoint.latest_step(tmp_path / "checkpoints") == 2 * STEPS_PER_EPOCH
    config = resolve_config(CONFIG)
    target = abstract_train_state(build_module(config), config)
    expected = checkpoint.restore(workdir / "checkpoints", target=target)
    actual = checkpoint.restore(tmp_path / "checkpoints", target=target)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert train(CONFIG, tmp_path, SOURCES) == resumed
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]


def test_workdir_layout_and_evaluate(trained):
    """The workdir has its files; evaluate() on the test source reproduces the summary's test accuracy."""
    workdir, final = trained
    assert {"config.json", "checkpoints", "metrics.jsonl", "tb", "summary.json"} <= {p.name for p in workdir.iterdir()}
    assert json.loads((workdir / "summary.json").read_text()) == final
    assert final["test_count"] == len(SOURCES["test"])
    result = evaluate(workdir, source=SOURCES["test"], batch_size=CONFIG.batch_size)
    assert result["count"] == 30 and result["accuracy"] == final["test_acc"]
    module, variables, config = load_trained(workdir)
    assert config["model_kwargs"] == {"widths": [4, 8, 8]} and set(variables) == {"params", "batch_stats"}


def _damage(checkpoint_dir: Path, damage: str) -> None:
    """Truncate the array metadata, overwrite every array data file, or overwrite the step metadata."""
    if damage == "truncate_metadata":
        victims, garbage = [checkpoint_dir / "default" / "_METADATA"], None
    elif damage == "garbage_data":
        victims, garbage = [p for p in checkpoint_dir.rglob("*") if p.is_file() and p.parent.name == "d"], b"\x00junk" * 9
    else:
        victims, garbage = [checkpoint_dir / "_CHECKPOINT_METADATA"], b"{not json"
    for victim in victims:
        victim.write_bytes(garbage if garbage is not None else victim.read_bytes()[: victim.stat().st_size // 2])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
@pytest.mark.parametrize("damage", ["truncate_metadata", "garbage_data", "garbage_step_metadata"])
def test_corrupt_checkpoint_raises_and_is_left_alone(trained, tmp_path, damage):
    """A damaged checkpoint gives a one-line CheckpointError naming it on load, and no file changes."""
    workdir = Path(shutil.copytree(trained[0], tmp_path / "run"))
    latest = workdir / "checkpoints" / str(checkpoint.latest_step(workdir / "checkpoints"))
    _damage(latest, damage)
    before = _snapshot(workdir)
    with pytest.raises(CheckpointError, match=str(latest)) as error:
        load_trained(workdir)
    assert "\n" not in str(error.value)
    assert _snapshot(workdir) == before


def _flip_bytes(checkpoint_dir: Path) -> None:
    """Invert 8 bytes in the middle of the largest array data file: same size, still decodable."""
    victim = max((p for p in checkpoint_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                 key=lambda p: p.stat().st_size)
    content = bytearray(victim.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 8] = bytes(b ^ 0xFF for b in content[middle:middle + 8])
    victim.write_bytes(bytes(content))


def test_flipped_bytes_are_refused_on_load(trained, tmp_path):
    """Bytes changed in place (same size) are a one-line CheckpointError naming the file, not other numbers."""
    workdir = Path(shutil.copytree(trained[0], tmp_path / "run"))
    latest = workdir / "checkpoints" / str(checkpoint.latest_step(workdir / "checkpoints"))
    _flip_bytes(latest)
    with pytest.raises(CheckpointError, match="SHA-256 differs") as error:
        load_trained(workdir)
    assert "\n" not in str(error.value) and str(latest) in str(error.value)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
@pytest.mark.parametrize("damage", ["flip", "garbage_data"])
def test_training_resumes_from_the_newest_readable_checkpoint(trained, tmp_path, damage):
    """A run whose latest checkpoint is damaged warns once, removes it, redoes that epoch from the one before and
    ends with the uninterrupted run's state and metrics."""
    workdir, final = trained
    train(CONFIG, tmp_path, SOURCES, stop_after=1)
    train(CONFIG, tmp_path, SOURCES)
    latest = tmp_path / "checkpoints" / str(2 * STEPS_PER_EPOCH)
    _flip_bytes(latest) if damage == "flip" else _damage(latest, damage)
    with pytest.warns(CheckpointWarning, match=f"step\\(s\\) {2 * STEPS_PER_EPOCH} are removed"):
        resumed = train(CONFIG, tmp_path, SOURCES)
    assert resumed == {**final, "seconds": resumed["seconds"]}
    config = resolve_config(CONFIG)
    target = abstract_train_state(build_module(config), config)
    for a, b in zip(jax.tree.leaves(checkpoint.restore(workdir / "checkpoints", target=target)),
                    jax.tree.leaves(checkpoint.restore(tmp_path / "checkpoints", target=target))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_config_refuses_to_resume(trained, tmp_path):
    """Resuming a workdir with a different config raises CheckpointError and changes no file."""
    workdir = Path(shutil.copytree(trained[0], tmp_path / "run"))
    before = _snapshot(workdir)
    with pytest.raises(CheckpointError, match="seed"):
        train(dataclasses.replace(CONFIG, seed=1), workdir, SOURCES)
    assert _snapshot(workdir) == before


def test_missing_workdir_or_config_raises(trained, tmp_path):
    """load_trained names the missing workdir or config.json in a CheckpointError."""
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained(tmp_path / "nothing")
    workdir = Path(shutil.copytree(trained[0], tmp_path / "run"))
    (workdir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_trained(workdir)
    with pytest.raises(CheckpointError, match="config.json"):
        train(CONFIG, workdir, SOURCES)


def test_bfloat16_computes_in_half_precision_and_keeps_float32_state(trained, tmp_path):
    """--dtype bfloat16: the parameters, optimizer state and BatchNorm statistics stay float32, the forward pass
    runs in bfloat16 (its logits differ from float32's by bfloat16 rounding, not more), and 2 epochs land near the
    float32 run."""
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    summary = train(config, tmp_path, SOURCES)
    module, variables, values = load_trained(tmp_path)
    assert values["dtype"] == "bfloat16"
    assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    state = checkpoint.restore(tmp_path / "checkpoints")
    assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(state["opt_state"]) if np.size(leaf) > 1} \
        == {np.dtype(np.float32)}
    final = trained[1]
    assert 0 < abs(summary["train_loss"] - final["train_loss"]) < 0.1 and np.isfinite(summary["val_loss"])
    images = _batch()["image"]
    full = np.asarray(module.apply(variables, images, train=False))
    half = np.asarray(module.apply(jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), variables),
                                   images.astype(jax.numpy.bfloat16), train=False), np.float32)
    assert 0 < np.abs(full - half).max() < 0.05 * np.abs(full).max()


def test_an_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(AgmcError, match="--dtype must be one of"):
        train(dataclasses.replace(CONFIG, dtype="float8"), tmp_path, SOURCES)
    assert not any(tmp_path.iterdir())
