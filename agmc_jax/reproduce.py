"""Reproduction configs: one Python file per published setting, run as baseline training -> compress -> a
comparison with the published figure, each stage resumable.

A config file defines `get_config()` returning an `ml_collections.ConfigDict` (the Flax examples' convention)
with `train` (the fields of `TrainConfig`), `compress` (options of `agmc compress`, by their argument names)
and `published` (the paper, its dense and compressed figures and the budget they were reached at).
"""
import ast
import importlib.util
import json
from pathlib import Path

import ml_collections

from agmc_jax import checkpoint
from agmc_jax.errors import UsageError
from agmc_jax.compression import COMPRESS_OPTIONS, CompressConfig, compress
from agmc_jax.train import TrainConfig, train


def load_config(path, overrides=()) -> ml_collections.ConfigDict:
    """The locked config of the file `path`, with `overrides` ("train.epochs=2", values as Python literals)."""
    path = Path(path)
    try:
        spec = importlib.util.spec_from_file_location(f"agmc_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as error:  # a config file is user code: whatever it raises is reported in one line
        line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(f"{path} is not a reproduction config ({type(error).__name__}: {line}); give a file of "
                         "experiments/configs/ that defines get_config()") from error
    if not isinstance(config, ml_collections.ConfigDict) or not {"train", "compress"} <= set(config.keys()):
        raise UsageError(f"{path}: get_config() must return an ml_collections.ConfigDict with train and compress "
                         f"sections, got {type(config).__name__}")
    config.lock()
    for override in overrides:
        _override(config, override)
    unknown = sorted(set(config.compress) - set(COMPRESS_OPTIONS))
    if unknown:
        raise UsageError(f"{path}: compress has no option {unknown[0]}; valid: {', '.join(sorted(COMPRESS_OPTIONS))}")
    return config


def _override(config, text: str) -> None:
    """Set one dotted field of `config` from "a.b=value"."""
    name, equals, value = text.partition("=")
    if not equals:
        raise UsageError(f"override {text!r} is not FIELD=VALUE; e.g. --set train.epochs=2")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare word is a string
    *parents, leaf = name.strip().split(".")
    if parents == ["compress"] and leaf not in COMPRESS_OPTIONS:
        raise UsageError(f"compress has no option {leaf}; valid: {', '.join(sorted(COMPRESS_OPTIONS))}")
    node = config
    try:
        for parent in parents:
            node = node[parent]
        if parents == ["compress"]:  # any option of compress, also one the file leaves at its default
            with node.unlocked():
                node[leaf] = parsed
        else:
            node[leaf] = parsed
    except (KeyError, AttributeError, TypeError) as error:
        fields = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
        reason = "no such field" if isinstance(error, (KeyError, AttributeError)) else "a value of another type"
        raise UsageError(f"cannot set {name.strip()} to {value!r} ({reason}); give an existing field "
                         f"{f'({fields}) ' if fields else ''}and a value of its type") from error


def compress_config(config, data_dir=None) -> CompressConfig:
    """The checked `CompressConfig` of a reproduction config's `compress` section."""
    return CompressConfig.from_options({**config.compress.to_dict(), "data_dir": data_dir})


def _measured(baseline: dict, report: dict) -> dict:
    """The figures of a run that a paper reports: test accuracy (%) before and after, and the fractions kept."""
    final = report.get("quantize", report)["accuracy"]["finetuned"]["test"]
    kept = {f"{name}_ratio": report[name]["ratio"] for name in ("macs", "params") if name in report}
    if "quantize" in report:
        kept["size_ratio"] = report["quantize"]["size_bytes"]["ratio"]
    return {"dense_test": 100 * baseline["test_acc"], "compressed_test": 100 * final, **kept}


def reproduce(config, workdir, data_dir=None) -> dict:
    """Run `config` in `workdir`: train the baseline (resuming), compress it (resuming), then write and return
    `reproduce.json`: the published figures next to the measured ones."""
    workdir = Path(workdir)
    compression = compress_config(config, data_dir)  # checked before the baseline trains
    train_config = TrainConfig(**{**config.train.to_dict(), "data_dir": data_dir})
    print(f"[baseline] {train_config.model} on {train_config.dataset}, {train_config.epochs} epoch(s) in "
          f"{workdir / 'baseline'}", flush=True)
    baseline = train(train_config, workdir / "baseline")
    print(f"[compress] {', '.join(compression.stages)} in {workdir / 'compress'}", flush=True)
    report = compress(compression, workdir / "compress", workdir=workdir / "baseline", resume=True).report
    summary = {"published": config.published.to_dict(), "measured": _measured(baseline, report),
               "baseline": str(workdir / "baseline"), "compress": str(workdir / "compress")}
    checkpoint.write_text(workdir / "reproduce.json", json.dumps(summary, indent=1) + "\n")
    return summary
