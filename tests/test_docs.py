"""The documentation: the site builds in strict mode (and a broken link fails it), its generated pages match the
code and the experiments' JSON, every public name has an API entry, every documented `agmc` command parses, and
the extending page's examples run (LeNet-5 on a few images, a few episodes)."""
import importlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import agmc_jax

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _build(docs_dir: Path, site_dir: Path, caplog) -> None:
    """`mkdocs build --strict` of mkdocs.yml with another docs_dir, in this process (no interpreter start-up)."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"), docs_dir=str(docs_dir), site_dir=str(site_dir), strict=True)
    config.plugins.on_startup(command="build", dirty=False)
    try:
        with caplog.at_level(logging.WARNING, logger="mkdocs"):
            build(config)
    finally:
        config.plugins.on_shutdown()


def test_the_site_builds_in_strict_mode_and_a_broken_link_fails_it(tmp_path, caplog, monkeypatch):
    from mkdocs.exceptions import Abort

    monkeypatch.chdir(ROOT)  # pymdownx.snippets includes examples/ relative to the working directory
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    try:
        _build(ROOT / "docs", tmp_path / "site", caplog)
    except Abort:
        pytest.fail("mkdocs build --strict failed:\n" + "\n".join(r.getMessage() for r in caplog.records
                                                                   if r.levelno >= logging.WARNING))
    assert (tmp_path / "site" / "notebooks" / "quickstart" / "index.html").exists()
    assert "agmc_jax.compress" in (tmp_path / "site" / "api" / "index.html").read_text()
    broken = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", broken)
    page = broken / "getting_started.md"
    page.write_text(page.read_text() + "\nSee [a page that does not exist](no_such_page.md).\n")
    caplog.clear()
    with pytest.raises(Abort):
        _build(broken, tmp_path / "broken_site", caplog)
    assert any("no_such_page.md" in r.getMessage() for r in caplog.records)


def test_generated_pages_match_the_parser_and_the_results():
    """docs/cli.md, docs/results/*.md and the README's headline table are what experiments/render_docs.py makes
    (in a fresh process: plugins imported by other tests would add methods and kinds to the help)."""
    done = subprocess.run([sys.executable, "experiments/render_docs.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "AGMC_PLUGINS": ""})
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_every_public_name_has_an_api_entry():
    page = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in agmc_jax.__all__ if f"::: agmc_jax.{name}\n" not in page]
    assert not missing, f"docs/api.md lacks '::: agmc_jax.NAME' for {', '.join(missing)}"


def test_the_readme_is_short_and_its_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets and not [t for t in targets if t and not (ROOT / t).exists()]


def _commands(path: Path) -> list:
    """The arguments of every `agmc` call (continuations joined; after `srun`, `&&`, `VAR=value`) in the bash blocks
    of a Markdown file."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # a line inside a quoted multi-line argument
                words = shlex.split(line.replace('"', ""), comments=True)
            segments = [[]]
            for word in words:
                if word in ("&&", "||", ";", "|"):
                    segments.append([])
                else:
                    segments[-1].append(word)
            for words in segments:
                calls = [i for i, word in enumerate(words) if word.rsplit("/", 1)[-1] == "agmc"]
                if calls:
                    found.append(words[calls[0] + 1:])
    return found


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(path, capsys):
    """The options of every command the README and the docs show exist (values are not run)."""
    from agmc_jax.cli import parser

    for argv in _commands(path):
        while "--plugin" in argv:  # plugins register names, which the parser does not check
            del argv[argv.index("--plugin"):argv.index("--plugin") + 2]
        try:
            parser().parse_args(argv)
        except SystemExit as stop:
            assert stop.code == 0, f"{path.name}: agmc {shlex.join(argv)}: {capsys.readouterr().err.strip()}"


# The extending page's examples, run small. Each registers at import (what `agmc --plugin` needs); the fixture
# restores every registry afterwards so the names do not leak into other tests of this process.

@pytest.fixture
def example():
    from agmc_jax.agents import AGENTS
    from agmc_jax.embed import STATES
    from agmc_jax.env import REWARDS
    from agmc_jax.kinds import KINDS

    registries = [agmc_jax.METHODS, agmc_jax.STAGES, AGENTS, STATES, REWARDS, KINDS]
    saved = [dict(r) for r in registries]

    def load(name):
        module = importlib.import_module(f"examples.{name}")
        return importlib.reload(module)  # registers again if an earlier test imported it

    yield load
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)


RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(64, 28, 28, 1)).astype(np.float32)
LABELS = RNG.integers(0, 10, 64).astype(np.int32)


def _lenet():
    from agmc_jax.networks import load_network

    return load_network(ROOT / "agmc_jax" / "baselines" / "lenet5_fashion_mnist")[:2]


def test_the_method_example_is_a_rule_that_meets_the_budget(example):
    custom = example("custom_method")
    module, variables = _lenet()
    result = agmc_jax.search(module, variables, (IMAGES, LABELS), method="taper", target_macs=0.5, progress=False,
                             eval_batch=32)
    assert result.macs <= 0.5 * result.net.macs * (1 + 1e-6)
    assert "amc-columns" in agmc_jax.METHODS and custom.TAPER is agmc_jax.METHODS["taper"]


def test_the_agent_example_keeps_the_best_episode(example):
    example("custom_agent")
    module, variables = _lenet()
    result = agmc_jax.search(module, variables, (IMAGES, LABELS), method="hill", target_macs=0.5, episodes=4,
                             agent_options={"sigma": 0.3}, progress=False, eval_batch=32)
    rewards = [episode["reward"] for episode in result.history]
    assert len(rewards) == 4 and result.reward == pytest.approx(max(rewards))
    assert float(result.agent_state.best_reward) == pytest.approx(max(rewards))
    with pytest.raises(agmc_jax.AgmcError, match="sigma must be positive"):  # its check, before anything is traced
        agmc_jax.search(None, None, (IMAGES, LABELS), method="hill", agent_options={"sigma": 0.0}, progress=False)


def test_the_reward_example_scores_by_its_formula(example):
    custom = example("custom_reward")
    module, variables = _lenet()
    result = agmc_jax.search(module, variables, (IMAGES, LABELS), method="uniform", target_macs=0.5,
                             reward="mnas", progress=False, eval_batch=32)
    expected = result.accuracy * (result.env.cost(result.counts)[0] / result.env.bounds[1]) ** custom.EXPONENT
    assert result.reward == pytest.approx(expected, rel=1e-5)


def test_the_stage_example_exports_the_compressed_network(example, tmp_path):
    example("portable_stage")
    from agmc_jax.models import create_model, init_model
    from agmc_jax.portable import load_exported

    module = create_model("lenet5", 10)
    variables = init_model(module, (28, 28, 1))
    rng = np.random.default_rng(1)
    splits = {split: (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n))
              for split, n in (("train", 128), ("validation", 64), ("test", 32))}
    config = agmc_jax.CompressConfig(stages=("portable",), reward_images=64)  # after prune in real use: slow here
    done = agmc_jax.compress(config, tmp_path / "c", module=module, variables=variables, data=splits)
    assert "## Portable export" in (tmp_path / "c" / "report.md").read_text()
    images = np.asarray(jax.random.normal(jax.random.key(0), (4, 28, 28, 1)))
    np.testing.assert_allclose(load_exported(done.report["portable"]["dir"])(images),
                               done.module.apply(done.variables, images, train=False), rtol=1e-5, atol=1e-5)


def test_the_results_pages_render_each_experiments_records(tmp_path, monkeypatch):
    """Records shaped as each experiment writes them (two seeds) render as mean ± std, with their provenance."""
    import json

    from experiments import render_docs

    def write(name, record):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": "python experiments/x.py", "date": "2026-12-07",
                                    "machine": "x86_64, 2 CPUs, cpu", **record}))

    for seed, test in ((0, 0.90), (1, 0.92)):
        for method in ("default", "uniform"):
            write(f"search_experiment/lenet5_fashion_mnist/macs=0.25/{method}/seed{seed}.json", {
                "network": "lenet5_fashion_mnist", "budget": "macs=0.25", "method": method, "seed": seed, "test": test - (method == "uniform") * 0.05,
                "pruned_test": 0.2, "macs_ratio": 0.25, "params_ratio": 0.3, "search_training_steps": 0,
                "seconds_total": 60.0, "config": {"method": method, "seed": seed, "rerank": 4 * (method == "default")},
                "rerank": [{"name": "uniform rule", "finetuned_top1": 0.80},  # the search's #2 leads it, #1 not
                           {"name": "search #2 (episode 3)", "finetuned_top1": 0.81 + seed / 100},
                           {"name": "search #1 (episode 7)", "finetuned_top1": 0.79}] * (method == "default")})
        write(f"search_settings/lenet5_fashion_mnist/macs=0.25/episodes50/seed{seed}.json", {
            "network": "lenet5_fashion_mnist", "budget": "macs=0.25", "setting": "episodes50", "seed": seed,
            "fields": {"episodes": 50}, "episodes": 50, "best_reward_by_episode": {"10": 0.5, "50": 0.6 + seed / 10},
            "search_top1": test, "rule_top1": 0.89, "lead": test - 0.89, "exported": ["uniform rule", "search #1"][seed],
            "seconds_search": 120.0})
        write(f"search_experiment/mine/params=0.1/default/seed{seed}.json", {  # a network of a user's: its records'
            "network": "mine", "budget": "params=0.1", "method": "default", "seed": seed, "test": test,  # dense top-1
            "dense_test": 0.95, "pruned_test": 0.2, "macs_ratio": 0.3, "params_ratio": 0.1, "search_training_steps": 0,
            "seconds_total": 60.0, "seconds_search": 30.0, "seconds_rerank": 6.0, "config": {"method": "default"}})
        write(f"compare_autocompress/macs=0.5/amc_seed{seed}.json", {
            "name": f"macs=0.5/amc_seed{seed}", "seed": seed, "macs": 0.5, "params": 0.4, "pruned_test": 0.5,
            "test": test, "trained_before": 0, "seconds": 60.0})
    write("compare_methods/run.json", {"args": {"marks": "50,100"}, "searches": {"amc": [
        {"seed": s, "best": {"50": 0.5, "100": 0.6}, "macs_ratio": 0.5, "pruned_val_acc": 0.6, "val_acc": t,
         "test_acc": t} for s, t in ((0, 0.9), (1, 0.92))]}})
    write("quantize/run.json", {"rows": {"lenet5 / uniform 4 bits": [
        {"bytes": 33494, "ptq_test_acc": 0.87, "qat_test_acc": t} for t in (0.87, 0.88)]}})
    write("bench_search/2026-12-07_000000.json", {"rows": [{"regime": "a", "ratio": 1.05}]})
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    pages = {path.name: text for path, text in render_docs.rendered_files(with_cli=False).items()}
    assert "| default | 2 | 91.00 ± 1.00 |" in pages["search_experiment.md"]
    assert "`rerank=4`" in pages["search_experiment.md"] and "+5.00 points" in pages["search_experiment.md"]
    assert "| lenet5_fashion_mnist (dense 88.00%) | macs=0.25 | 91.00 ± 1.00 (n=2) |" in pages["README.md"]
    assert "## lenet5_fashion_mnist (dense 88.00%)" in pages["search_experiment.md"]
    assert "## mine (dense 95.00%)" in pages["search_experiment.md"]
    assert "| default | 2 | 91.00 ± 1.00 | 20.00 ± 0.00 | 30.0 ± 0.0 | 10.0 ± 0.0 | 0 ± 0 | 0.5 ± 0.0 | 0.1 ± 0.0 | 1.0 ± 0.0 |" \
        in pages["search_experiment.md"]
    assert "k=1 -1.00 ± 0.00 (n=2), k=2 1.50 ± 0.50 (n=2)." in pages["search_experiment.md"]
    assert ('| episodes50 | `{"episodes": 50}` | 2 | 0.500 ± 0.000 | 0.650 ± 0.050 | 91.00 ± 1.00 | 89.00 ± 0.00 | '
            '2.00 ± 1.00 | 1 of 2 | 2.0 ± 0.0 |') in pages["search_settings.md"]
    assert "| macs=0.5 | amc | 2 |" in pages["compare_autocompress.md"]
    assert "91.00 ± 1.00" in pages["compare_methods.md"] and "87.50 ± 0.50" in pages["quantize.md"]
    assert "| a | 1.05 |" in pages["bench_search.md"] and "2026-12-07" in pages["index.md"]
