"""AutoCompress (Liu et al., AAAI 2020): rounds of annealing, ADMM structured pruning, purification, retraining.

A structure (`filter`, `column` or `both`) is a sequence of stages per round; `both` runs a filter
stage then a column stage. Stage j of J keeps at most keep^(j / J) of the original network's
MACs (and parameters): the per-round target 1 - (1 - s)^(1/N) of the paper, as cumulative budgets so
that rounding never compounds. A stage:

1. searches per-step keep counts on the current network by simulated annealing with the experience
   rule (`annealing` for filters: one step per channel group; `annealing_columns`: one per layer),
   scoring each neighbour by the compiled masked evaluation with BatchNorm re-estimated; the search's
   `lbound` applies to what earlier stages left (lbound times the fraction of the MACs still there);
2. trains with ADMM towards that structure (`prune.admm`), then takes its hard masks;
3. purifies (`prune.purify`): drops the channels the masks left useless, checking that the outputs
   do not change, and slims the network (channels removed physically; column zeros stay masked);
4. retrains with every zero fixed.

Filter pruning exports a physically smaller network. Column pruning changes no tensor's shape: its
export is the masked network (the zeros in place), which runs no faster than the dense one; only
the channels purification removes make it smaller.
"""
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from agmc_jax import checkpoint, data, runs
from agmc_jax.agents import AnnealingConfig, OptionError
from agmc_jax.agents.registry import AGENTS, agent_config
from agmc_jax.env import Budget, EnvConfig
from agmc_jax.errors import AdmmError, BudgetError, CheckpointError
from agmc_jax.graph import trace
from agmc_jax.prune import Slimmed, slim_variables
from agmc_jax.prune.admm import (AdmmConfig, Feed, FitConfig, Sparsity, Target, admm_train, check_admm_config,
                                 masked_train)
from agmc_jax.prune.purify import purify, sparse_cost
from agmc_jax.search import get_method, search
from agmc_jax.train import evaluate_arrays

STAGES = {"filter": ("filter",), "column": ("column",), "both": ("filter", "column")}
SEARCHES = {"filter": "annealing", "column": "annealing_columns"}  # the search method of each stage
TOLERANCE = 1e-4  # largest change of a logit that purification may cause (float32 sums in another order)


class AutoCompressConfig(NamedTuple):
    """The rounds and the training phases; ADMM's schedule (rho x1.3 per update, every `admm_interval` steps)."""

    structure: str = "filter"  # filter | column | both
    rounds: int = 2
    episodes: int = 60  # annealing episodes per stage
    admm_epochs: int = 2
    retrain_epochs: int = 2
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.1
    rho_growth: float = 1.3
    rho_max: float = 1.0
    admm_interval: int = 200


def check_config(config: AutoCompressConfig) -> None:
    """Raise `AdmmError` on settings that cannot run."""
    if config.structure not in STAGES:
        raise AdmmError(f"unknown structure {config.structure!r}; choose one of: {', '.join(STAGES)}")
    if min(config.rounds, config.episodes, config.admm_epochs, config.retrain_epochs) < 1:
        raise AdmmError("rounds, episodes, admm_epochs and retrain_epochs must be positive")
    if not config.learning_rate > 0:
        raise AdmmError(f"learning_rate must be positive, got {config.learning_rate}")
    check_admm_config(_admm(config))


def _admm(config):
    return AdmmConfig(config.rho, config.rho_growth, config.rho_max, config.admm_interval)


def _fit(config, epochs):
    return FitConfig(epochs, config.learning_rate, config.momentum, config.weight_decay)


def split_options(options: dict | None) -> tuple:
    """(AutoCompressConfig, annealing options) from one dict of values or `KEY=VALUE` strings."""
    options = dict(options or {})
    own = {k: options.pop(k) for k in list(options) if k in AutoCompressConfig._fields}
    unknown = sorted(set(options) - set(AnnealingConfig._fields))
    if unknown:
        raise OptionError(f"autocompress has no option {unknown[0]!r}; its options are: "
                          f"{', '.join(AutoCompressConfig._fields + AnnealingConfig._fields)}")
    pseudo = AGENTS["annealing"]._replace(name="autocompress", config=AutoCompressConfig, defaults=lambda e: {},
                                          check=check_config)
    config = agent_config(pseudo, own)
    agent_config(AGENTS["annealing"], options, config.episodes)  # checks the annealing options now
    return config, options


def structure_masks(variables):
    """The masks a network's zeros are: kernels (arrays of rank > 1) keep their non-zero weights."""
    return jax.tree.map(lambda v: (np.asarray(v) != 0).astype(np.float32) if np.ndim(v) > 1 else
                        np.ones(np.shape(v), np.float32), variables)


def _masked(variables, masks):
    return jax.tree.map(lambda v, m: np.asarray(v) * m, variables, masks)


def _logits(module, net, variables, images):
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, **net.call_kwargs))(variables, images))


def minimum_cost(net, variables, structure) -> tuple:
    """(MACs, parameters) when every group keeps one channel and/or every layer one column: below this no
    structure ADMM can reach exists."""
    sparsity = Sparsity(net)
    stages = STAGES[structure]
    target = Target(np.ones(len(sparsity.sizes), np.int64) if "filter" in stages else None,
                    np.ones(len(sparsity.columns), np.int64) if "column" in stages else None)
    return sparse_cost(net, sparsity.masks(variables, target))


class AutoCompressResult(NamedTuple):
    """The compressed network, its cost (weights kept) against the original's, and one record per stage."""

    module: Any
    variables: Any
    macs: float
    params: float
    dense_macs: int
    dense_params: int
    stages: list


def _targets(target_macs, target_params, fraction):
    return [None if t is None else t ** fraction for t in (target_macs, target_params)]


def check_budget(net, variables, config, target_macs, target_params, env_options):
    """Raise `BudgetError` before any training when the budget or the first stage's cannot be reached."""
    if target_macs is None and target_params is None:
        raise BudgetError("give a budget: --target-macs or --target-params")
    for name, value in (("target-macs", target_macs), ("target-params", target_params)):
        if value is not None and not 0 < value < 1:
            raise BudgetError(f"--{name} must be in (0, 1), got {value}")
    macs, params = minimum_cost(net, variables, config.structure)
    for name, value, low, total in (("MACs", target_macs, macs, net.macs), ("parameters", target_params, params,
                                                                            net.params)):
        if value is not None and value * total < low:
            raise BudgetError(f"no {config.structure} structure reaches {value} of the {name}: with one channel per "
                              f"group and one column per layer it keeps {low / total:.4f}; raise the budget")
    first = STAGES[config.structure][0]
    stages = config.rounds * len(STAGES[config.structure])
    env = EnvConfig(*_targets(target_macs, target_params, 1 / stages), **env_options)
    Budget(get_method(SEARCHES[first]).kind(net, env), env)  # the first stage's budget, with its lbound


def _fingerprint(net, variables, validation, feed, config, target_macs, target_params, seed, env_options, annealing):
    """What a resumed AutoCompress must share with the saved one: network, weights, data (hashed) and settings."""
    return {"model": type(net.module).__name__, "macs": net.macs, "params": net.params,
            "variables": checkpoint.digest(variables), "data": checkpoint.digest(validation),
            "train": checkpoint.digest(dict(next(iter(feed.batches(0))))), "config": config._asdict(),
            "target_macs": target_macs, "target_params": target_params, "seed": seed, "env": env_options,
            "annealing": annealing}


def _resume(out, base, fingerprint, resume):
    """(stages done, module, variables, records) of the newest readable checkpoint in `out`, or None to start
    afresh; a checkpoint of other weights, data or settings is refused in one line naming what differs."""
    directory = None if out is None else Path(out).absolute() / "stages"
    if directory is None or checkpoint.latest_step(directory) is None:
        return None
    if not resume:
        raise CheckpointError(f"{out} already holds AutoCompress stages; pass --resume or choose a new --out")

    found = runs.resume(directory, fingerprint, lambda step, meta: checkpoint.restore(directory, step),
                        "resume with the same network, data and settings or choose a new --out",
                        saved=lambda step, meta: meta.get("fingerprint", {}), hashed=("variables", "data", "train"))
    if found is None:
        return None
    _, meta, variables = found
    return meta["done"], (Slimmed(base) if meta["slim"] else base), variables, meta["records"]


def _stage(module, base, variables, validation, feed, config, kind, budget, seed, env_options, annealing, progress):
    """One stage: search, ADMM, hard masks, purification (checked), slimming, retraining; returns
    (module, variables, record)."""
    images, labels = validation
    net = trace(module, variables, images[:1])
    masks = structure_masks(variables)
    macs, params = sparse_cost(net, masks)
    record = {"structure": kind, "budget": {"macs": budget[0], "params": budget[1]}}
    if all(b is None or now <= b for now, b in zip((macs, params), budget)):
        return module, variables, {**record, "skipped": "the network already meets this stage's budget"}
    fractions = [None if b is None or b >= total else b / total for b, total in zip(budget, (net.macs, net.params))]
    lbound = env_options.get("lbound", EnvConfig().lbound) * macs / net.macs  # of what earlier stages left
    result = search(module, variables, validation, method=SEARCHES[kind], target_macs=fractions[0],
                    target_params=fractions[1], episodes=config.episodes, seed=seed, progress=progress,
                    agent_options=annealing, **{**env_options, "lbound": lbound})
    counts = np.asarray(result.counts)
    target = Target(filters=counts) if kind == "filter" else Target(columns=counts)
    sparsity = Sparsity(net)
    trained, history = admm_train(module, variables, feed, sparsity, target, _fit(config, config.admm_epochs),
                                  _admm(config), masks)
    hard = jax.tree.map(lambda a, b: np.asarray(a) * np.asarray(b), sparsity.masks(trained, target), masks)
    purified = purify(net, trained, hard)
    masked = _masked(trained, purified.masks)
    small = slim_variables(net, masked, purified.vectors)
    smaller = isinstance(module, Slimmed) or not all(v.all() for v in purified.vectors)
    slimmed = Slimmed(base) if smaller else module
    probe = images[:min(len(images), 256)]
    before = _logits(module, net, masked, probe)
    change = float(np.max(np.abs(before - _logits(slimmed, net, small, probe))))
    if change > TOLERANCE * max(1.0, float(np.max(np.abs(before)))):
        raise AdmmError(f"purification changed the outputs by {change:.3g}: the network maps 0 to something else "
                        "than 0 between layers (e.g. a sigmoid); use structure 'filter' without purification")
    pruned = evaluate_arrays(slimmed, small, images, labels)["accuracy"]
    retrained, metrics = masked_train(slimmed, small, structure_masks(small), feed, _fit(config, config.retrain_epochs))
    retrained = jax.device_get(retrained)
    return slimmed, retrained, {
        **record, "search": {"counts": counts.tolist(), "reward": result.reward, "accuracy": result.accuracy},
        "admm": {"distance_start": history[0]["distance"], "distance_end": history[-1]["distance"],
                 "rho_end": history[-1]["rho"], "train_loss": history[-1]["loss"]},
        "hard_masks": {"macs": purified.before[0], "params": purified.before[1]},
        "purified": {"channels": int(sum(purified.removed)), "macs": purified.before[0] - purified.after[0],
                     "params": purified.before[1] - purified.after[1], "max_output_change": change},
        "macs": purified.after[0], "params": purified.after[1], "pruned_accuracy": pruned,
        "retrained_accuracy": evaluate_arrays(slimmed, retrained, images, labels)["accuracy"],
        "retrain_loss": metrics["loss"]}


def autocompress(module, variables, feed: Feed, validation, target_macs=None, target_params=None,
                 config: AutoCompressConfig = AutoCompressConfig(), seed: int = 0, annealing_options=None,
                 out=None, resume=False, progress=False, **env_options) -> AutoCompressResult:
    """Compress (module, variables) under a budget (fractions of its MACs and/or parameters) by AutoCompress.

    `feed` trains (ADMM and retraining); `validation = (images, labels)` scores the search's neighbours (the
    first `calibration_images` also re-estimate BatchNorm) and the stages. `env_options` are `EnvConfig`
    fields (lbound, round_to, criterion l1/l2, ...), `annealing_options` fields of `AnnealingConfig`. With
    `out`, every finished stage is checkpointed in `out/stages`, and `resume=True` continues from the last.
    """
    check_config(config)
    images, labels = (np.asarray(a) for a in validation)
    net = trace(module, variables, images[:1])
    check_budget(net, variables, config, target_macs, target_params, env_options)
    kinds = STAGES[config.structure] * config.rounds
    fingerprint = _fingerprint(net, variables, (images, labels), feed, config, target_macs, target_params, seed,
                               env_options, annealing_options)
    base = module.base if isinstance(module, Slimmed) else module
    done, records = 0, []
    resumed = _resume(out, base, fingerprint, resume)
    if resumed is not None:
        done, module, variables, records = resumed
    for j in range(done, len(kinds)):
        budget = [None if t is None else t * total for t, total in
                  zip(_targets(target_macs, target_params, (j + 1) / len(kinds)), (net.macs, net.params))]
        module, variables, record = _stage(module, base, variables, (images, labels), feed, config, kinds[j], budget,
                                           seed + j, env_options, annealing_options, progress)
        records.append({"stage": j + 1, "round": j // len(STAGES[config.structure]) + 1, **record})
        if out is not None:
            checkpoint.save(Path(out).absolute() / "stages", j + 1, variables,
                            {"fingerprint": fingerprint, "done": j + 1, "slim": isinstance(module, Slimmed),
                             "records": records}, keep=2)
    final = trace(module, variables, images[:1])
    macs, params = sparse_cost(final, structure_masks(variables))
    return AutoCompressResult(module, variables, macs, params, net.macs, net.params, records)


def training_feed(source, dataset, batch_size, seed) -> Feed:
    """A `Feed` over a dataset's training source with its augmentation, shuffled per (seed, epoch)."""
    return Feed(lambda epoch: data.batches(source, dataset, batch_size, train=True, seed=seed, epoch=epoch),
                data.steps_per_epoch(source, batch_size))
