"""Searching a trained network directory and fine-tuning the result: `agmc search`, `agmc finetune` and the
building blocks of the compress stages."""
import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np

from agmc_jax import checkpoint, data
from agmc_jax.agents import parse_options
from agmc_jax.env import REWARDS
from agmc_jax.errors import AgmcError, CheckpointError, UsageError
from agmc_jax.networks import check_new_output, load_network, mark_trained_slim, save_network, save_quantized
from agmc_jax.prune.slim import Slimmed
from agmc_jax.report import plot_keep, plot_rewards
from agmc_jax.search import RERANK_STEPS, SearchConfig, build_config, default_criterion, get_method, search
from agmc_jax.train import (TrainConfig, check_workdir, config_from_dict, config_to_dict, resolve_config, started_from,
                            train)


SEARCH_OUTPUTS = ("search_state", "episodes.jsonl", "policy.json", "rewards.png", "keep.png", "masked", "slim",
                  "quantized", "finetune")  # what `agmc search` (and `agmc finetune`) write in its --out


def search_config(method="agmc", target_macs=None, target_params=None, episodes=100, seed=0, resume=False,
                  reward_images=1000, agent_options=None, data_dir=None, kind=None, rerank=0, rerank_steps=RERANK_STEPS,
                  **env_options) -> SearchConfig:
    """The `SearchConfig` of `run_search`'s keywords, every setting checked (nothing is read)."""
    if reward_images < 1:
        raise AgmcError(f"--reward-images must be at least 1, got {reward_images}")
    return build_config(get_method(method), episodes, seed, target_macs, target_params, agent_options, env_options,
                        kind=kind, rerank=rerank, rerank_steps=rerank_steps)


def check_search(workdir, out, resume=False, **options) -> SearchConfig:
    """The settings of `run_search` checked, and `out` checked against `workdir`, before anything is loaded."""
    config = search_config(**options)
    check_new_output(workdir, out, resume, "search", SEARCH_OUTPUTS)
    return config


def run_search(workdir, out, method="agmc", target_macs=None, target_params=None, episodes=100, seed=0,
               resume=False, reward_images=1000, data_dir=None, agent_options=None, kind=None, rerank=0,
               rerank_steps=RERANK_STEPS, **env_options):
    """Search a trained workdir's network on its validation split; writes policy, plots and networks to `out`.

    Every output is rewritten whole from the search's checkpointed state, so a resumed run finishes with the
    outputs of an uninterrupted one."""
    search_config = check_search(workdir, out, method=method, target_macs=target_macs, target_params=target_params,
                                 episodes=episodes, seed=seed, resume=resume, reward_images=reward_images,
                                 agent_options=agent_options, kind=kind, rerank=rerank, rerank_steps=rerank_steps,
                                 **env_options)
    module, variables, config = load_network(workdir)
    images, labels = data.load_arrays(config["dataset"], "validation", data_dir or config["data_dir"],
                                      limit=reward_images)
    with checkpoint.locked(out):
        result = search(module, variables, (images, labels), out=out, resume=resume, config=search_config,
                        train_data=training_images(search_config, config, data_dir))
        write_search(result, Path(out), workdir, method, config)
    return result


def training_images(search_config: SearchConfig, config, data_dir=None):
    """(images, labels) of the training batches a fine-tuned reward or the re-rank reads (None when neither does):
    the first batches of the training split in its shuffled, augmented order, as the fine-tune would see them."""
    env = search_config.env
    steps = max(env.reward_steps if REWARDS[env.reward].finetunes else 0,
                search_config.rerank_steps if search_config.rerank else 0)
    if not steps:
        return None
    source = data.load(config["dataset"], "train", data_dir or config["data_dir"])
    batches = list(itertools.islice(data.batches(source, config["dataset"], env.reward_batch, train=True,
                                                 seed=config["seed"]), steps))
    return tuple(np.concatenate([b[key] for b in batches]) for key in ("image", "label"))


def write_search(result, out, source, method, config):
    """The plots and the masked and exported networks of a search in `out`, each replaced in one rename."""
    policy = result.policy()
    plot_rewards(result.history, out / "rewards.png")
    plot_keep(policy, out / "keep.png")
    info = {"source": str(source), "method": method, "macs": policy["macs"], "params": policy["params"],
            "macs_ratio": policy["macs_ratio"], "params_ratio": policy["params_ratio"],
            "unit": policy["unit"], "keep": [step["keep"] for step in policy["steps"]]}
    pruned, masks = result.pruned()
    if result.env.kind.unit == "bits":  # latent weights on their grids, bit widths, the packed file
        with checkpoint.new_directory(out / "quantized", replace=True) as partial:
            save_quantized(partial, config, pruned, masks, isinstance(result.net.module, Slimmed), info)
        return
    exported = result.env.kind.export(pruned, masks)[1]
    for name, kind, tree in (("masked", "masked", pruned), ("slim", result.env.kind.export_name, exported)):
        with checkpoint.new_directory(out / name, replace=True) as partial:
            save_network(partial, kind, config, tree, info)


def search_options(args, resume=False):
    """`run_search` keyword arguments from the search options of `agmc search` or of a `CompressConfig` (no criterion:
    the kind's first, see `default_criterion`)."""
    names = ("method", "target_macs", "target_params", "episodes", "seed", "reward_images", "data_dir",
             "reward", "lbound", "round_to", "recalibrate_bn", "rerank", "rerank_steps")
    flags = {name: getattr(args, name) for name in ("warmup_episodes", "sigma_decay") if getattr(args, name) is not None}
    env = {name: getattr(args, name) for name in ("fill", "reward_steps", "reward_lr", "reward_dtype")
           if getattr(args, name) is not None}
    bits = {name: getattr(args, name) for name in ("kind", "target_size")
            if getattr(args, name, None) is not None}  # bits options: `agmc search` only (compress: its quantize stage)
    kind_options = parse_options(args.kind_option, "--kind-option")  # the kind's, and `agmc search`'s bit flags
    for name in ("min_bit", "max_bit"):
        flag = getattr(args, name, None)
        if flag is not None and kind_options.get(name, str(flag)) != str(flag):
            raise UsageError(f"--{name.replace('_', '-')} {flag} and --kind-option {name}={kind_options[name]} "
                             "disagree; give one")
        kind_options.update({} if flag is None else {name: flag})
    criterion = args.criterion or default_criterion(args.method, bits.get("kind"))
    return {**{name: getattr(args, name) for name in names}, **bits, **env, "criterion": criterion, "resume": resume,
            "kind_options": kind_options, "agent_options": {**flags, **parse_options(args.agent_option)}}


def finetune(search_dir, epochs=3, learning_rate=0.02, data_dir=None, seed=None, data_workers=None):
    """Train the slimmed (or sparse: its zeros stay zero) network of `search_dir` in `search_dir/finetune` (data
    order from `seed`, default the network's training seed; `data_workers` input processes, default the
    dataset's); returns its final metrics."""
    search_dir = Path(search_dir)
    if not (search_dir / "slim").is_dir():
        what = ("a bit-width search: its network is quantized/, fine-tuned by `agmc compress --stages "
                "prune,quantize`" if (search_dir / "quantized").is_dir() else
                "a training workdir: search it first (agmc search --workdir ... --out S), then finetune S"
                if (search_dir / "config.json").is_file() else "no slim network")
        raise CheckpointError(f"{search_dir} is not the --out of a pruning search ({what}); give the --out of "
                              "`agmc search` (channels or weights)")
    module, variables, config = load_network(search_dir / "slim")
    sparse = not isinstance(module, Slimmed)  # a sparse (fg) export keeps the original module and shapes
    tuned = finetune_config(config, epochs, learning_rate, data_dir, sparse, seed, data_workers)
    workdir = Path(search_dir) / "finetune"
    forget_other_start(workdir, variables)
    summary = train(tuned, workdir, module=module, variables=variables)
    mark_trained_slim(workdir, config_to_dict(tuned))
    return summary


def check_tuning(network: Path, workdir: Path, epochs, learning_rate, data_dir=None, seed=None, sparse=None) -> None:
    """Raise, before anything runs, the `CheckpointError` that training the saved `network` directory in `workdir`
    would raise once the steps before it are done again: a resumed run given other fine-tuning settings (nothing to
    check until both exist). `sparse` None: as the network's kind says."""
    description = Path(network) / "network.json"
    if not description.is_file() or not (Path(workdir) / "config.json").is_file():
        return
    values = json.loads(description.read_text())
    sparse = values.get("kind") != "slim" if sparse is None else sparse
    check_workdir(Path(workdir), finetune_config(values["config"], epochs, learning_rate, data_dir, sparse, seed),
                  "resume with the settings it was fine-tuned with, or compress into a new --out")


def forget_other_start(workdir, variables) -> None:
    """Remove a stage's training `workdir` when it started from other variables than these: the search before it
    found another network (its --episodes grew on --resume), so its training starts again."""
    if started_from(workdir) not in (None, checkpoint.digest(variables)):
        print(f"  the network that {workdir} trains has changed since its training started: training it afresh",
              flush=True)
        shutil.rmtree(workdir)


def finetune_config(config_dict, epochs, learning_rate, data_dir=None, sparse=False, seed=None,
                    data_workers=None) -> TrainConfig:
    """The checked training config that fine-tunes a network trained with `config_dict` (its seed unless `seed`;
    `data_workers` input processes, default the dataset's)."""
    base = config_from_dict(config_dict)
    return resolve_config(dataclasses.replace(base, epochs=epochs, learning_rate=learning_rate, warmup_epochs=0,
                                              data_dir=data_dir or base.data_dir, sparse=sparse,
                                              seed=base.seed if seed is None else seed, data_workers=data_workers))
