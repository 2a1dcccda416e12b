"""The command-line pipelines: search a trained network, fine-tune the result, and compress end to end."""
import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from agmc_jax import data
from agmc_jax.agents import parse_options
from agmc_jax.autocompress import AUTOCOMPRESS, compress_autocompress
from agmc_jax.errors import AgmcError, CheckpointError
from agmc_jax.networks import evaluate_variables, load_network, mark_trained_slim, save_network
from agmc_jax.prune.slim import Slimmed
from agmc_jax.report import plot_keep, plot_rewards
from agmc_jax.search import build_config, get_method, search
from agmc_jax.train import config_from_dict, config_to_dict, train


def run_search(workdir, out, method="agmc", target_macs=None, target_params=None, episodes=100, seed=0,
               resume=False, reward_images=1000, data_dir=None, agent_options=None, **env_options):
    """Search a trained workdir's network on its validation split; writes policy, plots and networks to `out`."""
    search_config = build_config(get_method(method), episodes, seed, target_macs, target_params, agent_options,
                                 env_options)  # settings are checked before anything is loaded
    if reward_images < 1:
        raise AgmcError(f"--reward-images must be positive, got {reward_images}")
    module, variables, config = load_network(workdir)
    images, labels = data.load_arrays(config["dataset"], "validation", data_dir or config["data_dir"],
                                      limit=reward_images)
    out = Path(out)
    if (out / "slim" / "network.json").exists() and not resume:
        raise CheckpointError(f"{out} already holds a finished search; choose a new --out")
    result = search(module, variables, (images, labels), out=out, resume=resume, config=search_config)
    policy = result.policy()
    plot_rewards(result.history, out / "rewards.png")
    plot_keep(policy, out / "keep.png")
    info = {"source": str(workdir), "method": method, "macs": policy["macs"], "params": policy["params"],
            "macs_ratio": policy["macs_ratio"], "params_ratio": policy["params_ratio"],
            "unit": policy["unit"], "keep": [step["keep"] for step in policy["steps"]]}
    if not (out / "slim" / "network.json").exists():
        pruned, masks = result.pruned()
        exported = result.env.kind.export(pruned, masks)[1]
        for name, kind, tree in (("masked", "masked", pruned), ("slim", result.env.kind.export_name, exported)):
            if (out / name / "network.json").exists():
                continue
            if (out / name).exists():  # a write cut short: network.json is written last
                shutil.rmtree(out / name)
            save_network(out / name, kind, config, tree, info)
    return result


def search_options(args):
    """`run_search` keyword arguments from the search options of `agmc search` and `agmc compress`."""
    names = ("method", "target_macs", "target_params", "episodes", "seed", "resume", "reward_images", "data_dir",
             "reward", "lbound", "round_to", "criterion", "recalibrate_bn")
    flags = {name: getattr(args, name) for name in ("warmup_episodes", "sigma_decay") if getattr(args, name) is not None}
    return {**{name: getattr(args, name) for name in names},
            "agent_options": {**flags, **parse_options(args.agent_option)}}


def finetune(search_dir, epochs=3, learning_rate=0.02, data_dir=None):
    """Train the slimmed (or sparse: its zeros stay zero) network of `search_dir` in `search_dir/finetune`;
    returns its final metrics."""
    module, variables, config = load_network(Path(search_dir) / "slim")
    base = config_from_dict(config)
    sparse = not isinstance(module, Slimmed)  # a sparse (fg) export keeps the original module and shapes
    tuned = dataclasses.replace(base, epochs=epochs, learning_rate=learning_rate, warmup_epochs=0,
                                data_dir=data_dir or base.data_dir, sparse=sparse)
    workdir = Path(search_dir) / "finetune"
    summary = train(tuned, workdir, module=module, variables=variables)
    mark_trained_slim(workdir, config_to_dict(tuned))
    return summary


def latency_ms(module, variables, input_shape, batch, repeats=5):
    """Median wall time of one jitted forward pass at `batch`, in milliseconds."""
    x = jax.numpy.zeros((batch, *input_shape), jax.numpy.float32)
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
    forward(variables, x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(variables, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def compress(args):
    """baseline -> search -> slim -> fine-tune -> report (report.md and report.json in --out)."""
    if args.method == AUTOCOMPRESS:  # not a search: rounds of annealing, ADMM, purification and retraining
        return compress_autocompress(args, latency_ms, markdown_report)
    out = Path(args.out)
    module, variables, config = load_network(args.workdir)
    shape = tuple(config["input_shape"])
    print(f"[1/4] baseline {config['model']} on {config['dataset']}", flush=True)
    dense = {split: evaluate_variables(module, variables, config, split, args.data_dir)["accuracy"]
             for split in ("validation", "test")}
    print(f"[2/4] search: {args.method}, {args.episodes} episodes", flush=True)
    result = run_search(args.workdir, out / "search", **search_options(args))
    slim_module, slim_variables, _ = load_network(out / "search" / "slim")
    pruned = {split: evaluate_variables(slim_module, slim_variables, config, split, args.data_dir)["accuracy"]
              for split in ("validation", "test")}
    print(f"[3/4] fine-tune the slimmed network, {args.finetune_epochs} epoch(s)", flush=True)
    tuned = finetune(out / "search", args.finetune_epochs, args.lr, args.data_dir)
    policy = result.policy()
    report = {
        "model": config["model"], "dataset": config["dataset"], "method": args.method,
        "macs": {"dense": result.net.macs, "slim": policy["macs"], "ratio": policy["macs_ratio"]},
        "params": {"dense": result.net.params, "slim": policy["params"], "ratio": policy["params_ratio"]},
        "accuracy": {"dense": dense, "pruned": pruned,
                     "finetuned": {"validation": tuned["val_acc"], "test": tuned["test_acc"]}},
        "latency_ms_batch128": {"dense": latency_ms(module, variables, shape, 128),
                                "slim": latency_ms(slim_module, slim_variables, shape, 128)},
        "layers": policy["layers"],
    }
    print("[4/4] report", flush=True)
    text = markdown_report(report)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(text)
    print(text)


def markdown_report(report):
    """The compression report as a Markdown table of layers and a summary table."""
    acc, latency = report["accuracy"], report["latency_ms_batch128"]
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
    return "\n".join(lines) + "\n"
