"""The command-line pipelines: search a trained network, fine-tune the result, and compress end to end."""
import dataclasses
import itertools
import json
from pathlib import Path

import jax
import numpy as np

from agmc_jax import checkpoint, data
from agmc_jax.agents import parse_options
from agmc_jax.autocompress import AUTOCOMPRESS, compress_autocompress
from agmc_jax.env import REWARDS, Budget
from agmc_jax.errors import AgmcError
from agmc_jax.graph import trace
from agmc_jax.kinds import KINDS
from agmc_jax.latency import latency_ms
from agmc_jax.networks import (check_new_output, evaluate_variables, load_network, mark_trained_quantized,
                               mark_trained_slim, save_network, save_quantized)
from agmc_jax.prune.slim import Slimmed
from agmc_jax.quant import save_packed
from agmc_jax.report import plot_keep, plot_rewards
from agmc_jax.search import RERANK_STEPS, SearchConfig, build_config, get_method, search
from agmc_jax.train import TrainConfig, config_from_dict, config_to_dict, resolve_config, train


def check_search(workdir, out, method="agmc", target_macs=None, target_params=None, episodes=100, seed=0,
                 resume=False, reward_images=1000, agent_options=None, data_dir=None, kind=None, rerank=0,
                 rerank_steps=RERANK_STEPS, **env_options) -> SearchConfig:
    """The settings of `run_search` checked, and `out` checked against `workdir`, before anything is loaded."""
    if reward_images < 1:
        raise AgmcError(f"--reward-images must be at least 1, got {reward_images}")
    config = build_config(get_method(method), episodes, seed, target_macs, target_params, agent_options, env_options,
                          kind=kind, rerank=rerank, rerank_steps=rerank_steps)
    check_new_output(workdir, out, resume)
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


# The options of `agmc compress` besides --workdir, --out and --resume, with their command-line defaults: what a
# reproduction config's `compress` may set (tests/test_reproduce.py checks they match the command line).
COMPRESS_OPTIONS = {
    "data_dir": None, "finetune_epochs": 1, "lr": 0.02, "method": "agmc", "target_macs": None, "target_params": None,
    "episodes": 100, "seed": 0, "reward": "acc", "reward_images": 1000, "lbound": 0.2, "round_to": None,
    "criterion": "l2", "recalibrate_bn": True, "agent_option": [], "warmup_episodes": None, "sigma_decay": None,
    "stages": ("prune",), "quant_method": "ppo", "quant_target_size": 0.25, "quant_min_bit": None,
    "quant_max_bit": None, "qat_epochs": 1, "reward_steps": None, "reward_lr": None, "fill": None, "rerank": 0,
    "rerank_steps": RERANK_STEPS,
}


def search_options(args):
    """`run_search` keyword arguments from the search options of `agmc search` and `agmc compress`."""
    names = ("method", "target_macs", "target_params", "episodes", "seed", "resume", "reward_images", "data_dir",
             "reward", "lbound", "round_to", "criterion", "recalibrate_bn", "rerank", "rerank_steps")
    flags = {name: getattr(args, name) for name in ("warmup_episodes", "sigma_decay") if getattr(args, name) is not None}
    env = {name: getattr(args, name) for name in ("fill", "reward_steps", "reward_lr") if getattr(args, name) is not None}
    bits = {name: getattr(args, name) for name in ("kind", "target_size", "min_bit", "max_bit")
            if getattr(args, name, None) is not None}  # `agmc search` only: compress has its quantize stage's own
    return {**{name: getattr(args, name) for name in names}, **bits, **env,
            "agent_options": {**flags, **parse_options(args.agent_option)}}


def finetune(search_dir, epochs=3, learning_rate=0.02, data_dir=None):
    """Train the slimmed (or sparse: its zeros stay zero) network of `search_dir` in `search_dir/finetune`;
    returns its final metrics."""
    module, variables, config = load_network(Path(search_dir) / "slim")
    sparse = not isinstance(module, Slimmed)  # a sparse (fg) export keeps the original module and shapes
    tuned = finetune_config(config, epochs, learning_rate, data_dir, sparse)
    workdir = Path(search_dir) / "finetune"
    summary = train(tuned, workdir, module=module, variables=variables)
    mark_trained_slim(workdir, config_to_dict(tuned))
    return summary


def finetune_config(config_dict, epochs, learning_rate, data_dir=None, sparse=False) -> TrainConfig:
    """The checked training config that fine-tunes a network trained with `config_dict`."""
    base = config_from_dict(config_dict)
    return resolve_config(dataclasses.replace(base, epochs=epochs, learning_rate=learning_rate, warmup_epochs=0,
                                              data_dir=data_dir or base.data_dir, sparse=sparse))


STAGES = ("prune", "quantize")


def quantize_options(args):
    """`run_search` keyword arguments of the quantize stage of `agmc compress`: a bit-width search."""
    options = {**search_options(args), "method": args.quant_method, "kind": "bits", "target_macs": None,
               "target_params": None, "target_size": args.quant_target_size, "criterion": "l2", "round_to": 1,
               "rerank": 0}
    options.update({name: getattr(args, f"quant_{name}") for name in ("min_bit", "max_bit")
                    if getattr(args, f"quant_{name}") is not None})
    return options


def check_compress(args):
    """Every option of `agmc compress` checked, and the trained network and its data found, before the first
    expensive step; returns the network (module, variables, config dict)."""
    if "prune" in args.stages:
        check_search(args.workdir, args.out, **search_options(args))
    if "quantize" in args.stages:
        if REWARDS[args.reward].finetunes:
            raise AgmcError(f"the quantize stage searches bit widths, which the {args.reward} reward cannot train; "
                            "choose --reward acc (or another) with --stages quantize")
        quantize = check_search(args.workdir, args.out, **quantize_options(args))
    module, variables, config = load_network(args.workdir)
    if args.stages[0] == "quantize":  # the network it quantizes is this one: its size budget is checked now
        Budget(KINDS["bits"](trace(module, variables, tuple(config["input_shape"])), quantize.env), quantize.env)
    finetune_config(config, args.finetune_epochs, args.lr, args.data_dir)
    data.load(config["dataset"], "validation", args.data_dir or config["data_dir"])
    return module, variables, config


def _accuracy(module, variables, config, data_dir):
    return {split: evaluate_variables(module, variables, config, split, data_dir)["accuracy"]
            for split in ("validation", "test")}


def _float_bytes(variables):
    """The size of `variables` stored as float32."""
    return 4 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables))


def prune_stage(args, out, module, variables, config):
    """search -> slim -> fine-tune; returns the report's prune fields and the fine-tuned network's workdir."""
    shape = tuple(config["input_shape"])
    print(f"  search: {args.method}, {args.episodes} episodes", flush=True)
    result = run_search(args.workdir, out / "search", **search_options(args))  # checks the agent before compiling
    slim_module, slim_variables, _ = load_network(out / "search" / "slim")
    pruned = _accuracy(slim_module, slim_variables, config, args.data_dir)
    print(f"  fine-tune the slimmed network, {args.finetune_epochs} epoch(s)", flush=True)
    tuned = finetune(out / "search", args.finetune_epochs, args.lr, args.data_dir)
    policy = result.policy()
    return {
        "macs": {"dense": result.net.macs, "slim": policy["macs"], "ratio": policy["macs_ratio"]},
        "params": {"dense": result.net.params, "slim": policy["params"], "ratio": policy["params_ratio"]},
        "accuracy": {"pruned": pruned, "finetuned": {"validation": tuned["val_acc"], "test": tuned["test_acc"]}},
        "latency_ms_batch128": latency_ms({"dense": (module, variables), "slim": (slim_module, slim_variables)},
                                          shape, 128),
        "layers": policy["layers"],
        **({"rerank": policy["rerank"]} if "rerank" in policy else {}),
    }, out / "search" / "finetune"


def quantize_stage(args, out, source):
    """bit-width search on the network of `source` -> quantization-aware fine-tune -> packed export; returns the
    report's quantize section."""
    print(f"  bit-width search: {args.quant_method}, {args.episodes} episodes", flush=True)
    result = run_search(source, out / "search", **quantize_options(args))
    module, variables, config = load_network(out / "search" / "quantized")
    quantized = _accuracy(module, variables, config, args.data_dir)
    print(f"  quantization-aware fine-tune, {args.qat_epochs} epoch(s)", flush=True)
    tuned_config = finetune_config(config, args.qat_epochs, args.lr, args.data_dir)
    workdir = out / "qat"
    tuned = train(tuned_config, workdir, module=module, variables=variables)
    mark_trained_quantized(workdir, config_to_dict(tuned_config), module.bits, isinstance(module.module, Slimmed))
    latent = load_network(workdir)[1]
    packed, partial = out / "model.packed", out / "model.packed.partial"
    partial.unlink(missing_ok=True)  # a write cut short
    size = save_packed(partial, latent, module.bits)
    partial.replace(packed)  # whole or not at all: a resumed run rewrites it
    policy = result.policy()
    return {
        "method": args.quant_method, "bits": policy["bits"],
        "size_bytes": {"float32": _float_bytes(variables), "packed": size, "packed_file": str(packed),
                       "ratio": size / _float_bytes(variables)},
        "accuracy": {"quantized": quantized, "finetuned": {"validation": tuned["val_acc"], "test": tuned["test_acc"]}},
    }


def compress(args):
    """baseline -> the `--stages` (prune: search, slim, fine-tune; quantize: bit widths, QAT, packed export) ->
    report (report.md and report.json in --out).

    With `args.resume` every stage continues or redoes its work from what is saved: searches from their
    checkpoints, fine-tuning from its own, and the evaluations and report are recomputed."""
    if args.method == AUTOCOMPRESS:  # not a search: rounds of annealing, ADMM, purification and retraining
        return compress_autocompress(args, markdown_report)
    out = Path(args.out)
    module, variables, config = check_compress(args)
    print(f"[1/{len(args.stages) + 2}] baseline {config['model']} on {config['dataset']}", flush=True)
    report = {"model": config["model"], "dataset": config["dataset"], "stages": list(args.stages),
              "method": args.method if "prune" in args.stages else args.quant_method,
              "accuracy": {"dense": _accuracy(module, variables, config, args.data_dir)},
              "size_bytes_float32": _float_bytes(variables)}
    source = args.workdir
    for number, stage in enumerate(args.stages, 2):
        print(f"[{number}/{len(args.stages) + 2}] {stage}", flush=True)
        if stage == "prune":
            pruned, source = prune_stage(args, out, module, variables, config)
            report = {**report, **pruned, "accuracy": {**report["accuracy"], **pruned["accuracy"]}}
        else:
            report["quantize"] = quantize_stage(args, out / "quantize", source)
    print(f"[{len(args.stages) + 2}/{len(args.stages) + 2}] report", flush=True)
    text = markdown_report(report) + quantize_report(report)
    checkpoint.write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    checkpoint.write_text(out / "report.md", text)
    print(text)


def markdown_report(report):
    """The compression report as a Markdown table of layers and a summary table (the dense accuracy alone for a
    run that did not prune)."""
    acc = report["accuracy"]
    if "macs" not in report:
        return (f"# {report['model']} on {report['dataset']}: {report['method']}\n\n| accuracy | dense |\n|---|---|\n"
                + "".join(f"| {split} | {acc['dense'][split]:.4f} |\n" for split in ("validation", "test")))
    latency = report["latency_ms_batch128"]
    lines = [f"# {report['model']} on {report['dataset']}: {report['method']}", "",
             "| | dense | compressed | ratio |", "|---|---|---|---|",
             f"| MACs | {report['macs']['dense']:,} | {report['macs']['slim']:,} | {report['macs']['ratio']:.3f} |",
             f"| parameters | {report['params']['dense']:,} | {report['params']['slim']:,} | "
             f"{report['params']['ratio']:.3f} |",
             f"| latency, batch 128 (ms) | {latency['dense']:.1f} | {latency['slim']:.1f} | "
             f"{latency['slim'] / latency['dense']:.3f} |", "",
             "| accuracy | dense | pruned | fine-tuned |", "|---|---|---|---|"]
    for split in ("validation", "test"):
        lines.append(f"| {split} | {acc['dense'][split]:.4f} | {acc['pruned'][split]:.4f} | "
                     f"{acc['finetuned'][split]:.4f} |")
    lines += ["", "| layer | channels before | after |", "|---|---|---|"]
    lines += [f"| {l['name']} | {l['out']} | {l['kept']} |" for l in report["layers"]]
    return "\n".join(lines + rerank_report(report.get("rerank", []))) + "\n"


def rerank_report(candidates):
    """The re-ranked candidates, best (the exported one) first, the uniform rule's among them ([] without)."""
    if not candidates:
        return []
    return ["", "## Re-ranked by a longer masked fine-tune (the first is exported)", "",
            "| candidate | search reward | fine-tuned top-1 | MACs ratio | params ratio |", "|---|---|---|---|---|"] + [
        f"| {c['name']} | {'-' if c['reward'] is None else format(c['reward'], '.4f')} | {c['finetuned_top1']:.4f} | "
        f"{c['macs_ratio']:.3f} | {c['params_ratio']:.3f} |" for c in candidates]


def quantize_report(report):
    """The quantize stage's Markdown: sizes on disk, accuracy before and after QAT, bits per layer ('' without it)."""
    if "quantize" not in report:
        return ""
    quant = report["quantize"]
    size, acc = quant["size_bytes"], quant["accuracy"]
    lines = ["", f"## Quantized: {quant['method']}", "", "| | float32 | packed file | ratio |", "|---|---|---|---|",
             f"| size (MB), the network quantized | {size['float32'] / 1e6:.4f} | {size['packed'] / 1e6:.4f} | "
             f"{size['ratio']:.3f} |",
             f"| size (MB), the original network | {report['size_bytes_float32'] / 1e6:.4f} | "
             f"{size['packed'] / 1e6:.4f} | {size['packed'] / report['size_bytes_float32']:.3f} |", "",
             "| accuracy | quantized | after QAT |", "|---|---|---|"]
    lines += [f"| {split} | {acc['quantized'][split]:.4f} | {acc['finetuned'][split]:.4f} |"
              for split in ("validation", "test")]
    lines += ["", "| layer | weight bits |", "|---|---|"] + [f"| {name} | {bits} |" for name, bits in quant["bits"].items()]
    return "\n".join(lines) + "\n"
