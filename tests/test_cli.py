"""The `agmc` command: counts, pruning the shipped baseline, and one-line errors with exit status 2."""
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmc_jax import checkpoint, prune, search
from agmc_jax.cli import main
from agmc_jax.data import load_arrays
from agmc_jax.errors import AgmcError, CheckpointError
from agmc_jax.graph import trace
from agmc_jax.graph.ir import evaluate
from agmc_jax.networks import load_network
from agmc_jax.prune.lstsq import REFIT_IMAGES, _program_at_batch
from agmc_jax.search import METHODS

BASELINE = Path(__file__).parents[1] / "agmc_jax" / "baselines" / "lenet5_fashion_mnist"


def run(capsys, *argv):
    """Exit status, stdout and stderr of `agmc argv`."""
    try:
        main(list(argv))
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def test_summary_json_has_top_level_counts(capsys):
    status, out, _ = run(capsys, "summary", "--model", "resnet56", "--json")
    summary = json.loads(out)
    assert status == 0
    assert abs(summary["params"] - 0.85e6) / 0.85e6 < 0.02 and abs(summary["macs"] - 125e6) / 125e6 < 0.02
    assert len(summary["layers"]) == 1 + 54 + 2 + 1  # stem, blocks, two projections, dense


def test_summary_table_for_another_input(capsys):
    status, out, _ = run(capsys, "summary", "--model", "lenet5", "--input", "32,32,3", "--classes", "5")
    assert status == 0 and "total:" in out and "Dense_2" in out


B, OUT = ("--workdir", str(BASELINE)), ("--out", "{tmp}/s")
SEARCH = ("search", *B, *OUT)


@pytest.mark.parametrize("argv, words", [
    (("summary", "--model", "resnet21"), "unknown model"),
    (("summary", "--model", "vgg16", "--input", "8,8,3"), "at least 32x32"),
    (("summary", "--model", "mobilenet_v1", "--width", "0"), "--width"),
    (("summary", "--model", "mobilenet_v1", "--width", "-1"), "--width"),
    (("summary", "--model", "lenet5", "--width", "0.5"), "--width"),
    (("train", "--model", "lenet5", "--dataset", "svhn", "--workdir", "{tmp}/w"), "unknown dataset"),
    (("train", "--model", "lenet5", "--epochs", "1", "--workdir", "{tmp}/w", "--data-dir", "{tmp}/none"),
     "dataset-fashion-mnist"),
    (("train", "--model", "lenet5", "--epochs", "1", "--workdir", "{tmp}/w", "--data-dir", "/nonexistent"),
     "/nonexistent"),  # refused although the default data is prepared
    (("train", "--model", "lenet5", "--epochs", "1", "--workdir", "{file}"), "is a file"),
    (("train", "--model", "resnet20", "--epochs", "1", "--workdir", "{tmp}/w", "--init-from", str(BASELINE)),
     "--init-from"),
    (("train", "--model", "lenet5", "--workdir", "{tmp}/w", "--lr", "nan"), "--lr"),
    (("train", "--model", "lenet5", "--workdir", "{tmp}/w", "--epochs", "0"), "--epochs"),
    (("train", "--model", "lenet5", "--workdir", "{tmp}/w", "--classes", "5"), "--classes 5 is below the 10"),
    (("train", "--model", "lenet5", "--workdir", "{tmp}/w", "--input", "32,32,3"),
     "(32, 32, 3) is not that of the training images (28, 28, 1); leave --input out"),
    ((*SEARCH, "--reward-dtype", "float8"), "--reward-dtype"),
    (("finetune", "{L}"), "search it first"),
    ((*SEARCH, "--seed", "99999999999999999999999"), "--seed"),
    (("evaluate", "--workdir", "{tmp}/missing"), "does not exist"),
    (("evaluate", "--workdir", "{unfinished}"), "not a network directory (it is the --out of `agmc search`); finish"),
    (("prune", *B, "--keep", "1.5", "--out", "{tmp}/p"), "(0, 1]"),
    (("prune", *B, "--keep", "0.5", "--out", "{file}"), "is a file"),
    (("prune", "--workdir", "{L}", "--keep", "0.5", "--out", "{L}"), "--workdir"),
    (("search", "--workdir", "{tmp}/missing", "--out", "{tmp}/s"), "does not exist"),
    ((*SEARCH, "--target-macs", "1.5"), "--target-macs"),
    ((*SEARCH, "--target-macs", "nan"), "--target-macs"),
    ((*SEARCH, "--method", "ppo9"), "unknown method"),
    ((*SEARCH, "--sigma-decay", "1.5"), "--sigma-decay"),
    ((*SEARCH, "--agent-option", "sigma_dcay=0.5"), "sigma_decay"),
    ((*SEARCH, "--agent-option", "nonsense"), "KEY=VALUE"),
    ((*SEARCH, "--method", "random", "--sigma-decay", "0.9"), "candidates"),
    ((*SEARCH, "--episodes", "0"), "--episodes"),
    ((*SEARCH, "--episodes", "-1"), "--episodes"),
    ((*SEARCH, "--round-to", "0"), "--round-to"),
    ((*SEARCH, "--round-to", "-2"), "--round-to"),
    ((*SEARCH, "--round-to", "1000", "--reward-images", "64"), "--round-to 1000"),
    ((*SEARCH, "--reward-images", "0"), "--reward-images"),
    ((*SEARCH, "--reward-images", "many"), "--reward-images"),
    ((*SEARCH, "--data-dir", "/nonexistent"), "/nonexistent"),
    (("search", *B, "--out", "{file}"), "is a file"),
    (("search", "--workdir", "{L}", "--out", "{L}"), "--workdir"),
    (("search", *B, "--out", "{unfinished}", "--method", "uniform"), "--resume"),
    (("search", *B, "--out", "{unfinished}", "--method", "uniform", "--resume", "--reward-images", "64"), "method"),
    (("search", *B, "--out", "{unfinished}", "--method", "random", "--resume", "--reward-images", "1000",
      "--episodes", "2"), "data"),
    (("search", *B, "--out", "{junk}", "--resume"), "notes.txt is not one of its files"),
    (("search", *B, "--out", "{L}", "--resume"), "not hold an `agmc search` run (it is a training workdir)"),
    (("compress", *B, "--out", "{unfinished}", "--resume"), "(it is the --out of `agmc search`)"),
    (("finetune", "{tmp}/s", "--lr", "nan"), "--lr"),
    (("finetune", "{tmp}/s", "--epochs", "0"), "--epochs"),
    (("compress", *B, "--out", "{tmp}/c", "--method", "random", "--agent-option", "sigma_decay=0.5"), "candidates"),
    (("compress", *B, "--out", "{tmp}/c", "--target-macs", "1.5"), "--target-macs"),
    (("compress", *B, "--out", "{tmp}/c", "--finetune-epochs", "0"), "--finetune-epochs"),
    (("compress", *B, "--out", "{tmp}/c", "--lr", "inf"), "--lr"),
    (("compress", *B, "--out", "{tmp}/c", "--criterion", "l3"), "criterion"),
    (("compress", *B, "--out", "{tmp}/c", "--data-dir", "/nonexistent"), "/nonexistent"),
    (("compress", *B, "--out", "{tmp}/c", "--reward-images", "64", "--agent-option", "tau=5"), "tau"),
    (("compress", *B, "--out", "{file}"), "is a file"),
])
def test_bad_input_is_one_line_and_exit_status_2_and_changes_nothing(capsys, caplog, tmp_path, prepared, unfinished,
                                                                      argv, words):
    """Exactly one line on stderr (no usage lines, no library warnings), exit status 2, no file written or changed."""
    (tmp_path / "file").write_text("keep me")
    if "{L}" in argv:
        shutil.copytree(BASELINE, tmp_path / "L")
    if "{unfinished}" in argv:
        shutil.copytree(unfinished, tmp_path / "unfinished")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a search")
    names = {"{junk}": str(tmp_path / "junk"), "{tmp}": str(tmp_path), "{file}": str(tmp_path / "file"), "{L}": str(tmp_path / "L"),
             "{unfinished}": str(tmp_path / "unfinished")}
    argv = [functools.reduce(lambda a, name: a.replace(name, names[name]), names, a) for a in argv]
    before = snapshot(tmp_path, BASELINE)
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"agmc {argv[0]}: error: ") and words in err
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert snapshot(tmp_path, BASELINE) == before


def snapshot(*roots):
    """Every path under `roots` with a hash of its bytes ('dir' for directories)."""
    return {str(p): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in [root, *root.rglob("*")] if p.exists()}


@pytest.fixture(scope="module")
def prepared():
    """The default Fashion-MNIST cache, prepared (a --data-dir that does not exist must still be refused)."""
    load_arrays("fashion_mnist", "validation", limit=1)


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """A random search of the baseline on 64 reward images cut short after its checkpoint (no policy or networks)."""
    out = tmp_path_factory.mktemp("unfinished") / "s"
    main(["search", *B, "--out", str(out), "--method", "random", "--episodes", "2", "--reward-images", "64"])
    for name in ("policy.json", "rewards.png", "keep.png", "masked", "slim"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return out


def test_search_help_lists_every_registered_method(capsys):
    status, out, _ = run(capsys, "search", "--help")
    words = set(out.replace(";", " ").split())
    assert status == 0 and METHODS
    assert all(f"{name}:" in words for name in METHODS), (sorted(METHODS), out)


def test_random_search_with_an_agent_option_on_the_baseline(capsys, tmp_path):
    out = tmp_path / "s"
    status, stdout, err = run(capsys, "search", "--workdir", str(BASELINE), "--out", str(out), "--method", "random",
                              "--agent-option", "candidates=2", "--episodes", "3", "--reward-images", "64")
    assert status == 0, err
    summary = json.loads(stdout)
    assert summary["macs_ratio"] <= 0.5 * (1 + 1e-6)
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 3  # 2 rounds of 2, the last one half played
    assert checkpoint.metadata(out / "search_state")["agent"] == {"candidates": 2}
    policy = json.loads((out / "policy.json").read_text())
    assert policy["macs"] == summary["macs"] and (out / "slim" / "network.json").exists()


@pytest.mark.parametrize("victim, damage", [
    ("_CHECKPOINT_METADATA", b"garbage"),  # orbax logs and goes on; nine lines of absl errors before
    ("_CHECKPOINT_METADATA", b'{"custom_metadata": 5}'),  # a traceback before
    ("default/_METADATA", b"garbage"),
    ("default/manifest.ocdbt", b"garbage" * 10),
])
def test_corrupt_checkpoint_is_one_line_and_left_alone(capsys, caplog, tmp_path, victim, damage):
    workdir = tmp_path / "w"
    shutil.copytree(BASELINE, workdir)
    (next((workdir / "checkpoints").iterdir()) / victim).write_bytes(damage)
    before = snapshot(tmp_path)
    status, _, err = run(capsys, "evaluate", "--workdir", str(workdir))
    assert status == 2 and len(err.splitlines()) == 1 and "corrupt" in err, err
    assert "<bound method" not in err and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert snapshot(tmp_path) == before


def test_uniform_rule_searches_and_resumes_to_the_same_outputs(capsys, tmp_path):
    argv = ("search", *B, "--out", str(tmp_path / "s"), "--method", "uniform", "--reward-images", "64")
    status, _, err = run(capsys, *argv)
    assert status == 0, err
    first = snapshot(tmp_path / "s")
    assert {"policy.json", "rewards.png", "keep.png"} <= {Path(p).name for p in first}
    assert (tmp_path / "s" / "slim" / "network.json").exists() and (tmp_path / "s" / "search_state").is_dir()
    status, _, err = run(capsys, *argv, "--resume")
    outputs = {p: h for p, h in first.items() if "variables" not in p and "search_state" not in p}
    assert status == 0 and {p: h for p, h in snapshot(tmp_path / "s").items() if p in outputs} == outputs


def test_resume_passes_over_a_corrupt_latest_checkpoint_and_episodes_may_grow(capsys, tmp_path):
    """Random search, 4 candidates per round: chunks of 12 episodes, so 13 episodes leave steps 12 and 13."""
    def search(out, episodes, *flags):
        status, _, err = run(capsys, "search", *B, "--out", str(tmp_path / out), "--method", "random",
                             "--episodes", str(episodes), "--reward-images", "64", *flags)
        assert status == 0, err
        return err

    search("s", 13)
    state = tmp_path / "s" / "search_state"
    assert checkpoint.steps(state) == [12, 13]
    whole = {name: (tmp_path / "s" / name).read_bytes() for name in ("episodes.jsonl", "policy.json")}
    (state / "13" / "default" / "manifest.ocdbt").write_bytes(b"garbage")
    err = search("s", 13, "--resume")
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "checkpoint 12" in warnings[0] and "13" in warnings[0], err
    assert not [line for line in err.splitlines() if "Traceback" in line or "WARNING" in line]
    assert whole == {name: (tmp_path / "s" / name).read_bytes() for name in whole}
    search("s", 15, "--resume")
    search("whole", 15)
    for name in ("episodes.jsonl", "policy.json", "slim/network.json", "masked/network.json"):
        assert (tmp_path / "s" / name).read_text() == (tmp_path / "whole" / name).read_text(), name


def test_resume_refuses_other_weights(capsys, tmp_path, unfinished):
    """Another trained LeNet-5 (the baseline's weights moved a little) cannot continue the baseline's search."""
    other = tmp_path / "other"
    shutil.copytree(BASELINE, other)
    step = checkpoint.latest_step(other / "checkpoints")
    state = checkpoint.restore(other / "checkpoints")
    state["params"] = jax.tree.map(lambda w: w * 1.01, state["params"])
    checkpoint.save(other / "checkpoints", step + 1, state, checkpoint.metadata(other / "checkpoints"))
    shutil.copytree(unfinished, tmp_path / "s")
    before = snapshot(tmp_path / "s")
    status, _, err = run(capsys, "search", "--workdir", str(other), "--out", str(tmp_path / "s"), "--method", "random",
                         "--episodes", "2", "--reward-images", "64", "--resume")
    assert status == 2 and len(err.splitlines()) == 1 and "variables" in err, err
    assert snapshot(tmp_path / "s") == before


def test_prune_writes_a_slim_network_that_reloads(capsys, tmp_path):
    status, out, _ = run(capsys, "prune", "--workdir", str(BASELINE), "--keep", "0.5", "--criterion", "l1",
                         "--out", str(tmp_path / "p"))
    report = json.loads(out)
    assert status == 0 and report["macs_ratio"] < 0.5
    assert report["counts"] == [3, 8, 64, 40]  # LeNet-5's 6/16/120/84 halved: exact below 16, else to multiples of 8
    module, variables, _ = load_network(tmp_path / "p")
    x, _ = load_arrays("fashion_mnist", "validation", limit=8)
    net = trace(module, variables, x[:1])
    assert net.macs == report["macs"]
    status, _, err = run(capsys, "prune", "--workdir", str(BASELINE), "--keep", "0.3", "--out", str(tmp_path / "p"))
    assert status == 2 and "already holds" in err


def test_least_squares_beats_magnitude_on_the_consuming_layer():
    """AMC's reconstruction: on real Fashion-MNIST batches the refitted layer's outputs are closer."""
    module, variables, _ = load_network(BASELINE)
    images, _ = load_arrays("fashion_mnist", "validation", limit=384)
    calibration, held_out = images[:256], images[256:]
    net = trace(module, variables, images[:1])
    keep = {g: 0.5 for g in range(len(net.group_sizes))}
    masks = prune.channel_masks(net, variables, keep, "l2")
    refitted = prune.reconstruct(net, variables, masks, calibration)

    program = _program_at_batch(net, len(held_out))
    conv_out = program.ops[net.layers[1].op_index].outputs[0]  # Conv_1 consumes the pruned Conv_0 channels

    def consumer_output(v):
        _, captured = evaluate(program, list(jax.tree.leaves(v)) + [held_out], [conv_out])
        return np.asarray(captured[conv_out])

    reference = consumer_output(variables)
    magnitude_error = np.mean((consumer_output(prune.apply_masks(net, variables, masks)) - reference) ** 2)
    refitted_error = np.mean((consumer_output(prune.apply_masks(net, refitted, masks)) - reference) ** 2)
    assert refitted_error < 0.8 * magnitude_error


def test_least_squares_refit_of_a_dense_layer_generalises():
    """LeNet-5's first dense layer, half its 16x25 inputs pruned, refitted on `REFIT_IMAGES` validation images:
    its outputs on held-out images come closer to the dense network's than magnitude pruning's."""
    module, variables, _ = load_network(BASELINE)
    images, _ = load_arrays("fashion_mnist", "validation", limit=REFIT_IMAGES + 256)
    held_out = images[REFIT_IMAGES:]
    net = trace(module, variables, images[:1])
    dense = next(layer for layer in net.layers if layer.kind == "dense")
    masks = prune.channel_masks(net, variables, {dense.in_group: 0.5}, "l2")  # 8 of 16 channels: 200 inputs
    program = _program_at_batch(net, len(held_out))
    out = program.ops[dense.op_index].outputs[0]

    def error(v):
        _, captured = evaluate(program, list(jax.tree.leaves(prune.apply_masks(net, v, masks))) + [held_out], [out])
        _, dense_captured = evaluate(program, list(jax.tree.leaves(variables)) + [held_out], [out])
        return np.mean((np.asarray(captured[out]) - np.asarray(dense_captured[out])) ** 2)

    magnitude = error(variables)
    assert error(prune.reconstruct(net, variables, masks, images[:REFIT_IMAGES])) < 0.2 * magnitude


def test_user_module_defined_here_searches_end_to_end():
    """A network the zoo has never seen: traced, searched, slimmed, run."""
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.relu(nn.Conv(6, (3, 3))(x))
            b = nn.relu(nn.Conv(4, (1, 1))(x))
            y = jnp.concatenate([a, b], axis=-1)
            y = y + nn.Conv(10, (3, 3))(y)
            return nn.Dense(3)(jnp.mean(y, axis=(1, 2)))

    module = Tiny()
    x = np.random.default_rng(0).normal(size=(40, 12, 12, 2)).astype(np.float32)
    variables = module.init(jax.random.key(0), x[:1])
    result = search(module, variables, (x, np.arange(40) % 3), method="random", target_macs=0.6, episodes=3,
                    progress=False)
    slim_module, slim_variables = result.slim()
    assert slim_module.apply(slim_variables, x[:2]).shape == (2, 3)
    assert trace(slim_module, slim_variables, x[:1]).macs == result.macs


def test_prune_re_estimates_batchnorm_so_a_pruned_resnet_is_not_at_chance(capsys, tmp_path):
    """Shipped ResNet-20, 70% of every group's channels, exactly (48% of the MACs): 10% without re-estimation, 49%
    with."""
    workdir = BASELINE.parent / "resnet20_fashion_mnist"
    accuracy = {}
    for flag in ("--recalibrate-bn", "--no-recalibrate-bn"):
        status, out, _ = run(capsys, "prune", "--workdir", str(workdir), "--keep", "0.7", "--round-to", "1", flag,
                             "--out", str(tmp_path / flag))
        assert status == 0
        accuracy[flag] = json.loads(out)["validation_accuracy"]
    assert accuracy["--no-recalibrate-bn"] < 0.2 < 0.4 < accuracy["--recalibrate-bn"]


def test_export_refuses_a_stage_that_did_not_finish(capsys, tmp_path):
    """A compress killed during its quantization-aware fine-tune holds quantize/qat without network.json: export
    stops in one line instead of exporting the earlier float network."""
    out = tmp_path / "c"
    shutil.copytree(BASELINE, out / "search" / "finetune")
    (out / "search" / "finetune" / "network.json").write_text("{}")
    (out / "quantize" / "qat").mkdir(parents=True)
    (out / "quantize" / "qat" / "config.json").write_text("{}")
    status, _, err = run(capsys, "export", str(out), "--out", str(tmp_path / "e"))
    assert status == 2 and "quantize/qat has not finished" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_an_output_under_a_file_is_refused_before_any_work(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    status, _, err = run(capsys, "search", "--workdir", str(BASELINE), "--out", str(tmp_path / "file" / "s"),
                         "--method", "random", "--episodes", "2")
    assert status == 2 and "is a file" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("raised, status, words", [
    (OSError(28, "No space left on device", "/full/disk"), 2, "cannot use /full/disk: No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_a_full_disk_or_an_interrupt_is_one_line(capsys, tmp_path, monkeypatch, raised, status, words):
    """What the operating system or the user stops a command with is one line and a non-zero exit status."""
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr("agmc_jax.networks.save_network", fail)
    code, _, err = run(capsys, "prune", "--workdir", str(BASELINE), "--keep", "0.5", "--out", str(tmp_path / "p"))
    assert code == status and words in err and len(err.splitlines()) == 1, err


def test_a_checkpoint_that_cannot_be_written_is_a_checkpoint_error(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def full(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device\n" + "detail\n" * 100)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*RESOURCE_EXHAUSTED") as error:
        checkpoint.save(tmp_path / "c", 1, {"a": np.zeros(3)})
    assert "\n" not in str(error.value)


@pytest.mark.slow  # minutes of end-to-end fine-tuning: run with -m slow
def test_a_compression_resumed_with_more_episodes_fine_tunes_the_new_result(capsys, tmp_path):
    """`compress --episodes 2`, then `--resume --episodes 6`: when the longer search exports another network, its
    fine-tune starts afresh (not the old network's checkpoints) and report.json agrees with policy.json."""
    out = tmp_path / "c"
    argv = ["compress", "--workdir", str(BASELINE), "--out", str(out), "--method", "random", "--target-macs", "0.4",
            "--round-to", "1", "--reward-images", "64", "--seed", "1"]  # seed 1: episode 8 is the best of 8
    status, _, err = run(capsys, *argv, "--episodes", "2")
    assert status == 0, err
    first = json.loads((out / "search" / "policy.json").read_text())
    status, printed, err = run(capsys, *argv, "--episodes", "8", "--resume")
    assert status == 0, err
    policy = json.loads((out / "search" / "policy.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["macs"]["slim"] == policy["macs"] and report["layers"] == policy["layers"]
    module, variables, _ = load_network(out / "search" / "finetune")
    assert trace(module, variables, (28, 28, 1)).macs == policy["macs"]
    assert policy["layers"] != first["layers"] and "training it afresh" in printed


@pytest.mark.parametrize("kwargs, words", [
    ({"episodes": 2.5}, "episodes must be a whole number"), ({"episodes": "3"}, "episodes must be a whole number"),
    ({"seed": 1.5}, "seed must be a whole number"), ({"target_macs": "0.5"}, "target_macs must be a fraction"),
    ({"module": object()}, "flax.linen.Module"),
])
def test_the_library_refuses_arguments_of_the_wrong_type(kwargs, words):
    module, variables, _ = load_network(BASELINE)
    images, labels = load_arrays("fashion_mnist", "validation", limit=8)
    options = {"method": "random", "target_macs": 0.5, "episodes": 2, **kwargs}
    with pytest.raises(AgmcError, match=words):
        search(options.pop("module", module), variables, (images, labels), **options)


CONFIG_FILES = {
    "raises": "def get_config():\n    raise RuntimeError('no GPU here\\nsecond line')\n",
    "dict": "def get_config():\n    return {'train': {}, 'compress': {}}\n",
}


@pytest.mark.parametrize("name, words", [("raises", "RuntimeError: no GPU here"), ("dict", "must return")])
def test_a_config_file_that_fails_is_one_line(capsys, tmp_path, name, words):
    path = tmp_path / f"{name}.py"
    path.write_text(CONFIG_FILES[name])
    status, _, err = run(capsys, "reproduce", str(path), "--workdir", str(tmp_path / "w"))
    assert status == 2 and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w").exists()


def test_a_bad_override_or_budget_is_refused_before_the_baseline_trains(capsys, tmp_path):
    config = str(Path(__file__).parents[1] / "experiments" / "configs" / "resnet56_cifar10.py")
    for override, words in (("compress.target_macs=1.5", "--target-macs must be a fraction"),
                            ("compress.no_such=1", "compress has no option no_such"),
                            ("train.nope=1", "no such field"), ("compress.rerank=-1", "--rerank must be")):
        status, _, err = run(capsys, "reproduce", config, "--workdir", str(tmp_path / "w"), "--set", override)
        assert status == 2 and words in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "w").exists()


def test_sigterm_is_one_line_and_status_143(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "agmc_jax.cli", "search", "--workdir", str(BASELINE), "--out",
                             str(tmp_path / "s"), "--method", "random", "--episodes", "100000"],
                            cwd=Path(__file__).parents[1], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "s" / "episodes.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if "agmc search:" in line]
    assert proc.returncode == 143 and lines == [lines[0]] and "interrupted" in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_ctrl_c_while_the_command_starts_is_one_line_and_status_130(tmp_path):
    """A signal while JAX imports (where its garbage-collector callback used to swallow it: exit 0) ends `agmc`."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "agmc_jax.cli", "summary", "--model", "lenet5"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    time.sleep(0.5)  # the guard is set 0.1 s after the start, the imports last seconds
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.splitlines() == ["agmc: interrupted while starting; nothing was written"]


def test_a_ctrl_c_a_garbage_collector_callback_swallows_is_raised_again(capsys):
    """Python reports a signal's exception inside a gc callback as ignored and goes on: it is raised again, unsaid."""
    import gc
    import signal
    import time

    from agmc_jax import interrupts

    fire = [True]

    def callback(phase, info):
        if fire:
            fire.pop()
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the callback

    restore = interrupts.install("search", at_once=False)
    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            gc.collect()
            time.sleep(30)  # where the signal is raised again, at once
    finally:
        gc.callbacks.remove(callback)
        restore()
    assert not fire and "Exception ignored" not in capsys.readouterr().err


@pytest.mark.parametrize("edit, words", [
    ({"model_kwargs": {"width": 2.0}}, "field model_kwargs {'width': 2.0} does not fit model lenet5"),
    ({"num_classes": "ten"}, 'field num_classes is "ten", not int | null'),
    ({"input_shape": [28, 28]}, "field input_shape is [28, 28], not [H, W, C]"),
    ({"learning_rate": "0.1"}, 'field learning_rate is "0.1", not float'),
])
def test_a_hand_edited_config_is_one_line_naming_the_file_and_field(capsys, tmp_path, edit, words):
    workdir = tmp_path / "w"
    shutil.copytree(BASELINE, workdir)
    (workdir / "config.json").write_text(json.dumps({**json.loads((BASELINE / "config.json").read_text()), **edit}))
    status, _, err = run(capsys, "evaluate", "--workdir", str(workdir))
    assert status == 2 and len(err.splitlines()) == 1 and f"{workdir / 'config.json'}: {words}" in err, err


@pytest.mark.parametrize("options, words", [
    (("--finetune-epochs", "2"), "epochs 1 -> 2"),
    (("--lr", "0.05"), "learning_rate 0.02 -> 0.05"),
])
def test_a_resumed_compression_with_other_fine_tuning_is_refused_before_anything_runs(capsys, tmp_path, options,
                                                                                       words):
    """What a finished prune stage leaves (its slim network, its fine-tune's config): resuming it with other
    fine-tuning settings is refused at once, not after the baseline and the search were done again."""
    from agmc_jax.pipeline import finetune_config
    from agmc_jax.train import config_to_dict

    base = json.loads((BASELINE / "config.json").read_text())
    out = tmp_path / "c"
    (out / "search" / "slim").mkdir(parents=True)
    (out / "search" / "finetune").mkdir()
    (out / "search" / "slim" / "network.json").write_text(json.dumps({"kind": "slim", "config": base}))
    (out / "search" / "finetune" / "config.json").write_text(json.dumps(config_to_dict(finetune_config(base, 1, 0.02))))
    before = snapshot(tmp_path)
    status, _, err = run(capsys, "compress", *B, "--out", str(out), "--resume", "--target-macs", "0.5", *options)
    assert status == 2 and len(err.splitlines()) == 1 and words in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["search", "compress"])
def test_an_output_given_as_a_network_says_which_directory_to_give(capsys, tmp_path, command):
    out = tmp_path / "o"
    network = out / ("slim" if command == "search" else "search/finetune")
    network.mkdir(parents=True)
    (network / "network.json").write_text("{}")
    (out / ("search_state" if command == "search" else "report.json")).mkdir()
    status, _, err = run(capsys, "evaluate", "--workdir", str(out))
    assert status == 2 and len(err.splitlines()) == 1, err
    assert f"(it is the --out of `agmc {command}`); give its network directory instead, e.g. {network}" in err


def test_a_step_whose_manifest_is_missing_is_refused_in_one_line(capsys, tmp_path):
    """The only step of a workdir that has manifests, its own removed: never read unverified."""
    workdir = tmp_path / "w"
    shutil.copytree(BASELINE, workdir)
    for manifest in (workdir / "checkpoints" / checkpoint.MANIFESTS).glob("*.json"):
        manifest.unlink()
    status, _, err = run(capsys, "evaluate", "--workdir", str(workdir))
    assert status == 2 and len(err.splitlines()) == 1 and "no checksum manifest" in err, err


def test_a_reader_that_closes_stdout_ends_the_command_quietly_and_not_as_success():
    """`agmc summary | head -1` style: stdout's reader is gone before the table is written; no traceback, no
    misleading 'free space' line, exit status 1 (the output was not all delivered)."""
    process = subprocess.Popen([sys.executable, "-m", "agmc_jax.cli", "summary", "--model", "resnet56"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 1 and err == "", err
