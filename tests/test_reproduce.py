"""`agmc reproduce`: every config of experiments/configs runs end to end on tfds mock data, resumes, and bad
configs or overrides are one line."""
import json
from pathlib import Path

import pytest

from agmc_jax.cli import parser
from agmc_jax.pipeline import COMPRESS_OPTIONS
from agmc_jax.reproduce import load_config
from test_cli import run, snapshot

CONFIGS = sorted((Path(__file__).parents[1] / "experiments" / "configs").glob("*.py"))
# A few steps of each stage; the ImageNet MobileNets also at a quarter width, so a CPU runs them.
SMALL = ("train.epochs=1", "train.warmup_epochs=0", "train.batch_size=8", "compress.episodes=2",
         "compress.reward_images=16", "compress.finetune_epochs=1")
SHRINK = {"imagenet2012": ("train.model_kwargs.width=0.25",)}


def test_compress_options_are_the_command_lines_defaults():
    parsed = vars(parser().parse_args(["compress", "--workdir", "w", "--out", "o"]))
    assert {k: v for k, v in parsed.items() if k not in ("workdir", "out", "resume", "run", "command")} \
        == COMPRESS_OPTIONS


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_runs_end_to_end_on_mock_data_and_resumes(capsys, tmp_path, config):
    loaded = load_config(config)
    assert set(loaded.published) >= {"paper", "dense", "compressed", "budget"}
    overrides = [part for override in SMALL + SHRINK.get(loaded.train.dataset, ()) for part in ("--set", override)]
    argv = ("reproduce", str(config), "--workdir", str(tmp_path / "w"), "--mock-data", "16", *overrides)
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    summary = json.loads(out[out.index("{\n \"published\""):])
    assert summary["published"] == loaded.published.to_dict()
    target = loaded.compress.target_macs
    assert 0 < summary["measured"]["macs_ratio"] <= target + 1e-6
    assert json.loads((tmp_path / "w" / "reproduce.json").read_text()) == summary
    before = snapshot(tmp_path / "w" / "baseline" / "checkpoints")
    status, out, err = run(capsys, *argv)  # a finished run resumes to the same result without training again
    assert status == 0 and json.loads(out[out.index("{\n \"published\""):])["measured"] == summary["measured"], err
    assert snapshot(tmp_path / "w" / "baseline" / "checkpoints") == before


@pytest.mark.parametrize("argv, words", [
    (("{config}", "--set", "train.epoch=3"), "train.epoch"),
    (("{config}", "--set", "train.epochs"), "FIELD=VALUE"),
    (("{config}", "--set", "train.epochs='many'"), "train.epochs"),
    (("{tmp}/missing.py",), "not a reproduction config"),
])
def test_bad_config_or_override_is_one_line(capsys, tmp_path, argv, words):
    names = {"{config}": str(CONFIGS[0]), "{tmp}": str(tmp_path)}
    argv = [names.get(part, part.replace("{tmp}", str(tmp_path))) for part in argv]
    status, _, err = run(capsys, "reproduce", *argv, "--workdir", str(tmp_path / "w"))
    assert status == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "w").exists()
