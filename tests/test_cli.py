"""The `agmc` command: counts, pruning the shipped baseline, and one-line errors with exit status 2."""
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmc_jax import checkpoint, prune, search
from agmc_jax.cli import main
from agmc_jax.data import load_arrays
from agmc_jax.graph import trace
from agmc_jax.graph.ir import evaluate
from agmc_jax.networks import load_network
from agmc_jax.prune.lstsq import _program_at_batch
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


@pytest.mark.parametrize("argv, words", [
    (("summary", "--model", "resnet21"), "unknown model"),
    (("summary", "--model", "vgg16", "--input", "8,8,3"), "at least 32x32"),
    (("train", "--model", "lenet5", "--dataset", "svhn", "--workdir", "{tmp}/w"), "unknown dataset"),
    (("train", "--model", "lenet5", "--epochs", "1", "--workdir", "{tmp}/w", "--data-dir", "{tmp}/none"),
     "dataset-fashion-mnist"),
    (("evaluate", "--workdir", "{tmp}/missing"), "does not exist"),
    (("search", "--workdir", "{tmp}/missing", "--out", "{tmp}/s"), "does not exist"),
    (("search", "--workdir", str(BASELINE), "--out", "{tmp}/s", "--target-macs", "1.5"), "(0, 1)"),
    (("search", "--workdir", str(BASELINE), "--out", "{tmp}/s", "--method", "ppo9"), "unknown method"),
    (("search", "--workdir", str(BASELINE), "--out", "{tmp}/s", "--sigma-decay", "1.5"), "--sigma-decay"),
    (("search", "--workdir", str(BASELINE), "--out", "{tmp}/s", "--agent-option", "sigma_dcay=0.5"), "sigma_decay"),
    (("search", "--workdir", str(BASELINE), "--out", "{tmp}/s", "--agent-option", "nonsense"), "KEY=VALUE"),
    (("search", "--workdir", str(BASELINE), "--out", "{tmp}/s", "--method", "random", "--sigma-decay", "0.9"),
     "candidates"),
    (("search", "--workdir", str(BASELINE), "--out", "{tmp}/s", "--episodes", "0"), "episodes"),
    (("search", "--workdir", str(BASELINE), "--out", "{tmp}/s", "--round-to", "0"), "--round-to"),
    (("compress", "--workdir", str(BASELINE), "--out", "{tmp}/c", "--method", "random", "--agent-option",
      "sigma_decay=0.5"), "candidates"),
    (("prune", "--workdir", str(BASELINE), "--keep", "1.5", "--out", "{tmp}/p"), "(0, 1]"),
])
def test_bad_input_is_one_line_and_exit_status_2(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.setenv("AGMC_TFDS_DIR", str(tmp_path / "tfds"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    status, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("agmc ")]
    assert status == 2
    assert len(lines) == 1 and words in lines[0]
    assert "Traceback" not in err
    if "--out" in argv:  # a refused run leaves its output directory as it was: absent
        out = Path(argv[argv.index("--out") + 1])
        assert not out.exists() or not any(out.iterdir())


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


def test_corrupt_checkpoint_is_reported_and_left_alone(capsys, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(BASELINE, workdir)
    victim = next(p for p in sorted((workdir / "checkpoints").rglob("*")) if p.is_file() and p.stat().st_size > 1000)
    victim.write_bytes(b"garbage" * 10)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    status, _, err = run(capsys, "evaluate", "--workdir", str(workdir))
    assert status == 2 and "corrupt" in err
    assert before == {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def test_prune_writes_a_slim_network_that_reloads(capsys, tmp_path):
    status, out, _ = run(capsys, "prune", "--workdir", str(BASELINE), "--keep", "0.5", "--criterion", "l1",
                         "--out", str(tmp_path / "p"))
    report = json.loads(out)
    assert status == 0 and report["macs_ratio"] < 0.5
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
    """Shipped ResNet-20, 70% of every group's channels (48% of the MACs): 10% without re-estimation, 49% with."""
    workdir = BASELINE.parent / "resnet20_fashion_mnist"
    accuracy = {}
    for flag in ("--recalibrate-bn", "--no-recalibrate-bn"):
        status, out, _ = run(capsys, "prune", "--workdir", str(workdir), "--keep", "0.7", flag,
                             "--out", str(tmp_path / flag))
        assert status == 0
        accuracy[flag] = json.loads(out)["validation_accuracy"]
    assert accuracy["--no-recalibrate-bn"] < 0.2 < 0.4 < accuracy["--recalibrate-bn"]
