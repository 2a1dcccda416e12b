"""`agmc_jax.compress`: a user's own module, variables and arrays through the stages; a stage registered from
outside the package; the config checked when it is built."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

import agmc_jax
from agmc_jax import data
from agmc_jax.cli import main, parser
from agmc_jax.errors import BudgetError, CheckpointError, DataNotFoundError, InputShapeError, UsageError
from agmc_jax.graph import trace
from agmc_jax.pipeline import search_options
from agmc_jax.portable import load_exported
from agmc_jax.stages import STAGES
from tests.test_cli import BASELINE, run


class TwoBranch(nn.Module):
    """A network the project has never seen: two parallel 3x3 / 5x5 branches summed, BatchNorm, a dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.relu(norm()(nn.Conv(24, (3, 3), strides=2)(x)))
        y = nn.Conv(32, (3, 3))(x) + nn.Conv(32, (5, 5))(x)
        y = nn.relu(norm()(y))
        y = nn.relu(nn.Conv(16, (3, 3), strides=2)(y))
        return nn.Dense(10)(y.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def user_network():
    """TwoBranch's variables and Fashion-MNIST arrays as a user holds them: uint8 images, integer labels."""
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    arrays = {"train": train.get(np.arange(512)), "validation": train.get(np.arange(512, 768)),
              "test": test.get(np.arange(256))}
    module = TwoBranch()
    variables = jax.device_get(module.init(jax.random.key(1), np.zeros((1, 28, 28, 1), np.float32)))
    return module, variables, arrays


def _top1(module, variables, images, labels, spec):
    """Test top-1 computed apart from the library's evaluator: normalised with the spec, argmax in NumPy."""
    x = (images.astype(np.float32) / 255 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return float(np.mean(np.argmax(np.asarray(module.apply(variables, x, train=False)), -1) == labels))


def test_compress_a_users_module_and_arrays(tmp_path, user_network):
    """The report's costs are the slim network's traced costs and meet the budget within a rounding step; its test
    accuracy is what an independent evaluation of the returned network gives; the default re-rank's candidates are
    reported, the exported policy first, with its wall time apart from the search's; a resumed call returns the
    same."""
    module, variables, arrays = user_network
    config = agmc_jax.CompressConfig(method="random", target_macs=0.5, episodes=4, reward_images=128, round_to=1,
                                     rerank_steps=2)
    result = agmc_jax.compress(config, tmp_path / "c", module=module, variables=variables, data=arrays)
    report = result.report
    dense = trace(module, variables, (28, 28, 1))
    slim = trace(result.module, result.variables, (28, 28, 1))
    assert (report["macs"]["dense"], report["macs"]["slim"]) == (dense.macs, slim.macs)
    assert report["params"]["slim"] == slim.params and report["macs"]["ratio"] <= 0.5
    assert report["macs"]["ratio"] > 0.5 - max(l.macs / l.out_channels for l in dense.layers) / dense.macs
    assert report["model"] == "TwoBranch" and report["dataset"].startswith("arrays-")
    ranked = report["rerank"]
    assert 2 <= len(ranked) <= 5 and any(c["name"].endswith("uniform rule") for c in ranked)
    best = max(c["finetuned_top1"] for c in ranked)  # exported: the best, or the rule within a standard error of it
    assert ranked[0]["finetuned_top1"] == best or (ranked[0]["name"].endswith("uniform rule") and
                                                   best - ranked[0]["finetuned_top1"] <= np.sqrt(2 * 0.25 / 128))
    spec = data.dataset_spec(report["dataset"])
    assert report["accuracy"]["finetuned"]["test"] == pytest.approx(
        _top1(result.module, result.variables, *arrays["test"], spec), abs=1e-6)
    assert json.loads((tmp_path / "c" / "report.json").read_text()) == report
    seconds = report["seconds"]  # the re-rank's wall time apart from the search's
    assert seconds["search"] > 0 and seconds["rerank"] > 0 and seconds["finetune"] > 0
    assert "Wall time: search" in (tmp_path / "c" / "report.md").read_text()
    again = agmc_jax.compress(config, tmp_path / "c", module=module, variables=variables, data=arrays, resume=True)
    assert again.report["accuracy"] == report["accuracy"] and again.report["layers"] == report["layers"]
    other = jax.tree.map(lambda v: v + 1, variables)
    with pytest.raises(CheckpointError, match="other variables"):
        agmc_jax.compress(config, tmp_path / "c", module=module, variables=other, data=arrays, resume=True)


@pytest.fixture
def export_stage():
    """The stage of `examples/portable_stage.py` registered (again, if an earlier test removed it) for one test."""
    import importlib

    importlib.reload(importlib.import_module("examples.portable_stage"))
    yield
    del STAGES["portable"]


@pytest.mark.slow  # 80 s of two compressions; the example stage alone runs by default in test_docs
def test_a_stage_registered_outside_the_package_runs_after_prune(capsys, tmp_path, export_stage):
    """The new stage runs on the fine-tuned network, from the library and the command line (listed in its help),
    adds its section to both reports, and its artifact computes the compressed network's logits."""
    config = agmc_jax.CompressConfig(stages=("portable", "prune"), method="random", target_macs=0.5, episodes=3,
                                     reward_images=64, rerank=0)
    assert config.stages == ("prune", "portable")
    result = agmc_jax.compress(config, tmp_path / "c", workdir=BASELINE)
    assert "## Portable export" in (tmp_path / "c" / "report.md").read_text()
    images = data.load_arrays("fashion_mnist", "test", limit=16)[0]
    np.testing.assert_allclose(load_exported(result.report["portable"]["dir"])(images),
                               result.module.apply(result.variables, images, train=False), rtol=1e-5, atol=1e-5)
    (tmp_path / "c" / "report.json").unlink()
    status, _, err = run(capsys, "compress", "--workdir", str(BASELINE), "--out", str(tmp_path / "c"), "--resume",
                         "--stages", "prune,portable", "--method", "random", "--target-macs", "0.5",
                         "--episodes", "3", "--reward-images", "64", "--no-rerank")  # resumed: the stage runs again
    assert status == 0, err
    assert json.loads((tmp_path / "c" / "report.json").read_text())["portable"] == result.report["portable"]
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    assert "portable: write the network" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("options, error, words", [
    ({"target_macs": 1.5}, BudgetError, "--target-macs must be a fraction"),
    ({"target_params": float("nan")}, BudgetError, "--target-params"),
    ({"quant_target_size": 0.0, "stages": ("quantize",)}, BudgetError, "--target-size"),
    ({"stages": ("prune", "autocompress"), "target_macs": 0.5}, UsageError, "not both"),
    ({"stages": ("squeeze",)}, UsageError, "stages must be some of"),
    ({"method": "nope", "target_macs": 0.5}, agmc_jax.AgmcError, "unknown method"),
    ({"reward": "finetuned", "stages": ("quantize",)}, UsageError, "cannot train"),
    ({"finetune_epochs": 0}, UsageError, "--finetune-epochs"),
    ({"lr": -1.0}, UsageError, "--lr"),
    ({"method": "autocompress"}, BudgetError, "give a budget"),
    ({"method": "autocompress", "target_macs": 0.5, "agent_option": {"temperature": "nan"}}, agmc_jax.AgmcError,
     "temperature"),
])
def test_a_config_is_checked_when_it_is_built(options, error, words):
    with pytest.raises(error, match=words):
        agmc_jax.CompressConfig(**options)


def test_autocompress_is_a_stage_and_its_old_spelling_too():
    assert agmc_jax.CompressConfig(method="autocompress", target_macs=0.5).stages == ("autocompress",)
    config = agmc_jax.CompressConfig(stages="autocompress", target_macs=0.5)
    assert config.stages == ("autocompress",) and config.method == "autocompress"
    with pytest.raises(UsageError, match="no option"):
        agmc_jax.CompressConfig.from_options({"target_mac": 0.5})


@pytest.mark.parametrize("change, error, words", [
    (lambda a: {k: v for k, v in a.items() if k != "test"}, DataNotFoundError, "no test split"),
    (lambda a: {**a, "train": (a["train"][0].astype(np.float32), a["train"][1])}, InputShapeError, "uint8"),
    (lambda a: {**a, "test": (a["test"][0][:, :20], a["test"][1])}, InputShapeError, "test images"),
    (lambda a: [a["train"]], UsageError, "mapping"),
])
def test_bad_user_data_is_one_error_and_nothing_written(tmp_path, user_network, change, error, words):
    module, variables, arrays = user_network
    config = agmc_jax.CompressConfig(method="random", target_macs=0.5, episodes=2)
    with pytest.raises(error, match=words):
        agmc_jax.compress(config, tmp_path / "c", module=module, variables=variables, data=change(arrays))
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_compress_takes_one_kind_of_input(tmp_path, user_network):
    module, variables, arrays = user_network
    config = agmc_jax.CompressConfig(target_macs=0.5)
    for kwargs in ({}, {"workdir": BASELINE, "module": module, "variables": variables, "data": arrays},
                   {"module": module, "data": arrays}):
        with pytest.raises(UsageError, match="either workdir"):
            agmc_jax.compress(config, tmp_path / "c", **kwargs)
    with pytest.raises(InputShapeError, match="cannot apply"):
        agmc_jax.compress(config, tmp_path / "c", module=module, variables={"params": {}}, data=arrays)


HOLD = """import sys
from agmc_jax import checkpoint
with checkpoint.locked(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_on_the_same_output_stops_in_one_line(capsys, tmp_path):
    """While another process writes an output directory, `agmc search` and `agmc compress` on it stop with one line
    naming that process, before writing anything; once it has ended, the same command runs."""
    out = tmp_path / "s"
    search = ["search", "--workdir", str(BASELINE), "--out", str(out), "--method", "random", "--episodes", "2",
              "--reward-images", "32", "--target-macs", "0.5"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (search, ["compress", *search[1:]]):
            status, _, err = run(capsys, *argv)
            assert status == 2 and f"in use by another agmc process (pid {holder.pid})" in err, err
            assert len(err.splitlines()) == 1 and [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    status, _, err = run(capsys, *search)
    assert status == 0, err


def test_compress_screens_by_least_squares_and_reranks_by_default_and_search_does_not():
    """`agmc compress`'s defaults (the proxy study's): lstsq where the kind refits channels, l2 where it keeps
    weights, a re-rank of 4; `agmc search` keeps the plain screening; `--no-rerank` turns it off, `--rerank 0` is
    refused."""
    def options(*argv):
        return vars(parser().parse_args([*argv, "--workdir", "w", "--out", "o"]))

    config = agmc_jax.CompressConfig(target_macs=0.5)
    assert (config.rerank, search_options(config)["criterion"]) == (4, "lstsq")
    assert search_options(agmc_jax.CompressConfig(kind="weights", target_params=0.5))["criterion"] == "l2"
    assert search_options(agmc_jax.CompressConfig(method="fg", target_params=0.5))["criterion"] == "l2"
    assert (options("compress")["rerank"], options("compress")["criterion"]) == (4, None)
    assert options("compress", "--no-rerank")["rerank"] == 0
    assert (options("search")["rerank"], options("search")["criterion"]) == (0, "l2")
    with pytest.raises(SystemExit):
        options("compress", "--rerank", "0")


def test_the_fine_tunes_take_the_input_workers_asked_for():
    """`--data-workers` of `agmc compress` and `agmc finetune` reach the fine-tune's training config; a bad count is
    refused where the config is checked."""
    from agmc_jax.errors import AgmcError
    from agmc_jax.pipeline import finetune_config
    from agmc_jax.train import load_trained

    trained = load_trained(BASELINE)[2]
    args = parser().parse_args(["compress", "--workdir", "w", "--out", "o", "--data-workers", "3"])
    assert agmc_jax.CompressConfig.from_options(args).data_workers == 3
    assert parser().parse_args(["finetune", "s", "--data-workers", "2"]).data_workers == 2
    assert finetune_config(trained, 1, 0.02, data_workers=2).data_workers == 2
    assert finetune_config(trained, 1, 0.02).data_workers is None  # the dataset's default, not the baseline run's
    with pytest.raises(AgmcError, match="worker"):
        finetune_config(trained, 1, 0.02, data_workers=-1)
