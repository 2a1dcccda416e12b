"""`agmc reproduce`: every config of experiments/configs runs end to end on tfds mock data (resnet56_cifar10 in
tests/test_notebooks.py, through colab/reproduce_cifar10.ipynb's dry run, and in the resume test; the others
with `pytest -m configs tests/test_reproduce.py`), a finished run resumes without training again, and bad
configs or overrides are one line."""
import json
from pathlib import Path

import pytest

from agmc_jax.cli import parser
from agmc_jax.compression import CompressConfig
from agmc_jax.reproduce import load_config
from test_cli import run, snapshot

CONFIGS = sorted((Path(__file__).parents[1] / "experiments" / "configs").glob("*.py"))
RESUMED = "resnet56_cifar10"  # the cheapest config on a CPU: the resume test runs it (a notebook too)
# One step of each stage (8 mock examples, batch 8); the ImageNet MobileNets at a quarter width, so a CPU runs them.
SMALL = ("train.epochs=1", "train.warmup_epochs=0", "train.batch_size=8", "compress.episodes=2",
         "compress.reward_images=8", "compress.finetune_epochs=1")
SHRINK = {"imagenet2012": ("train.model_kwargs.width=0.25",)}


def reproduce(capsys, config, workdir):
    """(exit status, the printed summary or None, stderr) of a small `agmc reproduce` of `config` on mock data."""
    loaded = load_config(config)
    overrides = [part for override in SMALL + SHRINK.get(loaded.train.dataset, ()) for part in ("--set", override)]
    status, out, err = run(capsys, "reproduce", str(config), "--workdir", str(workdir), "--mock-data", "8", *overrides)
    return status, json.loads(out[out.index("{\n \"published\""):]) if status == 0 else None, err


def test_compress_options_are_the_command_lines_defaults():
    parsed = vars(parser().parse_args(["compress", "--workdir", "w", "--out", "o"]))
    options = {k: v for k, v in parsed.items() if k not in ("workdir", "out", "resume", "run", "command", "coordinator",
                                                            "num_processes", "process_id", "distributed")}
    assert CompressConfig.from_options(options) == CompressConfig()


@pytest.mark.configs  # VGG-16 and the MobileNets: 10 min of the default suite's 2 cores, so they run apart
@pytest.mark.parametrize("config", [path for path in CONFIGS if path.stem != RESUMED],
                         ids=[path.stem for path in CONFIGS if path.stem != RESUMED])
def test_config_runs_end_to_end_on_mock_data(capsys, tmp_path, config):
    status, summary, err = reproduce(capsys, config, tmp_path / "w")
    assert status == 0, err
    check_summary(config, summary, tmp_path / "w")


def check_summary(config, summary, workdir):
    """The summary carries the config's published figures, a policy within its budget, and is reproduce.json."""
    loaded = load_config(config)
    assert set(loaded.published) >= {"paper", "dense", "compressed", "budget"}
    assert summary["published"] == loaded.published.to_dict()
    assert 0 < summary["measured"]["macs_ratio"] <= loaded.compress.target_macs + 1e-6
    assert 0 <= summary["measured"]["compressed_test"] <= 100
    assert json.loads((workdir / "reproduce.json").read_text()) == summary


@pytest.mark.slow  # minutes of end-to-end fine-tuning: run with -m slow
def test_a_finished_run_resumes_to_the_same_result_without_training_again(capsys, tmp_path):
    config = next(path for path in CONFIGS if path.stem == RESUMED)
    saved = (tmp_path / "w" / "baseline" / "checkpoints", tmp_path / "w" / "compress" / "search" / "search_state")
    status, first, err = reproduce(capsys, config, tmp_path / "w")
    assert status == 0, err
    check_summary(config, first, tmp_path / "w")
    before = snapshot(*saved)
    status, again, err = reproduce(capsys, config, tmp_path / "w")
    assert status == 0 and again["measured"] == first["measured"], err
    assert snapshot(*saved) == before


@pytest.mark.parametrize("argv, words", [
    (("{config}", "--set", "train.epoch=3"), "train.epoch"),
    (("{config}", "--set", "train.epochs"), "FIELD=VALUE"),
    (("{config}", "--set", "train.epochs='many'"), "train.epochs"),
    (("{config}", "--set", "compress.method=3"), "compress.method"),
    (("{tmp}/missing.py",), "not a reproduction config"),
])
def test_bad_config_or_override_is_one_line(capsys, tmp_path, argv, words):
    names = {"{config}": str(CONFIGS[0]), "{tmp}": str(tmp_path)}
    argv = [names.get(part, part.replace("{tmp}", str(tmp_path))) for part in argv]
    status, _, err = run(capsys, "reproduce", *argv, "--workdir", str(tmp_path / "w"))
    assert status == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "w").exists()
