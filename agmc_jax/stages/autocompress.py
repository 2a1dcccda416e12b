"""The autocompress stage (`--method autocompress` or `--stages autocompress`): AutoCompress's rounds of annealing,
ADMM structured pruning, purification and retraining, then a fine-tune with every pruned weight fixed; its report
section is the pruned network's summary and the rounds' table."""
import json

import jax
import numpy as np

from agmc_jax import data, runs
from agmc_jax.agents import parse_options
from agmc_jax.autocompress import autocompress, check_budget, split_options, structure_masks, training_feed
from agmc_jax.errors import BudgetError
from agmc_jax.graph import trace
from agmc_jax.latency import latency_ms
from agmc_jax.networks import accuracies, load_network, save_network
from agmc_jax.prune import Slimmed
from agmc_jax.prune.admm import FitConfig, masked_train
from agmc_jax.report import pruned_markdown
from agmc_jax.stages.registry import Stage, register_stage

AUTOCOMPRESS = "autocompress"


def _env_options(config) -> dict:
    return {"lbound": config.lbound, "round_to": config.round_to, "reward": config.reward,
            "criterion": config.criterion or "l2", "recalibrate_bn": config.recalibrate_bn}


def check(config) -> None:
    """AutoCompress's and annealing's options (`--agent-option`) checked, and a budget given."""
    split_options(parse_options(config.agent_option))
    if config.target_macs is None and config.target_params is None:
        raise BudgetError("give a budget: --target-macs or --target-params")


def check_network(config, network, first) -> None:
    """The budget, and its first stage's, reachable on the network."""
    module, variables, train_config = network
    net = trace(module, variables, tuple(train_config["input_shape"]))
    check_budget(net, variables, split_options(parse_options(config.agent_option))[0], config.target_macs,
                 config.target_params, _env_options(config))


def _tuning(config) -> dict:
    """What the final fine-tune's result depends on beyond the rounds: saved with it, compared on resume."""
    return {"epochs": config.finetune_epochs, "learning_rate": config.lr, "seed": config.seed}


def check_resume(run) -> None:
    """A resumed compression whose final fine-tune was done with other settings is refused before anything runs
    (an output written before the settings were saved with it is taken as it is)."""
    path = run.out / "finetune" / "network.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if "finetune" in saved:
        runs.refuse_foreign(saved["finetune"], _tuning(run.config), run.out / "finetune",
                            "resume with the settings it was fine-tuned with, or compress into a new --out")


def _layers(dense_net, final_net):
    return [{"name": a.name, "out": a.out_channels, "kept": b.out_channels}
            for a, b in zip(dense_net.layers, final_net.layers)]


def _export_note(result, dense_net):
    filters = any(l.out_channels < d.out_channels for l, d in zip(
        trace(result.module, result.variables, dense_net.example).layers, dense_net.layers))
    columns = any(np.count_nonzero(np.asarray(v)) < np.size(v) for v in jax.tree.leaves(result.variables["params"])
                  if np.ndim(v) > 1)
    return ("physically smaller (channels removed)" if filters else "same shapes") + (
        "; pruned columns kept as zeros in place (masked: no im2col export)" if columns else "")


def run(run, source, report):
    """AutoCompress's rounds (checkpointed in `run.out`/autocompress), the export, the fine-tune with every zero
    fixed; returns the report with its fields and the fine-tuned network's directory."""
    config, out = run.config, run.out
    options, annealing = split_options(parse_options(config.agent_option))
    module, variables, train_config = load_network(source)
    dataset, data_dir = train_config["dataset"], config.data_dir or train_config["data_dir"]
    shape = tuple(train_config["input_shape"])
    validation = data.load_arrays(dataset, "validation", data_dir, limit=config.reward_images)
    feed = training_feed(data.load(dataset, "train", data_dir), dataset, train_config["batch_size"], config.seed)
    dense_net = trace(module, variables, shape)
    print(f"  autocompress: {options.structure}, {options.rounds} round(s), {options.episodes} episodes a stage",
          flush=True)
    result = autocompress(module, variables, feed, validation, config.target_macs, config.target_params, options,
                          config.seed, annealing, out=out / "autocompress", resume=run.resume, progress=True,
                          **_env_options(config))
    info = {"source": str(source), "method": AUTOCOMPRESS, "macs": result.macs, "params": result.params,
            "stages": result.stages}
    kind = "slim" if isinstance(result.module, Slimmed) else "sparse"
    if not (out / "export" / "network.json").exists():
        save_network(out / "export", kind, train_config, result.variables, info)
    pruned = accuracies(result.module, result.variables, train_config, config.data_dir)
    if (out / "finetune" / "network.json").exists():  # resumed after its fine-tune (`check_resume`: same settings)
        tuned = load_network(out / "finetune")[1]
    else:
        print(f"  fine-tune with every pruned weight fixed, {config.finetune_epochs} epoch(s)", flush=True)
        fit = FitConfig(config.finetune_epochs, config.lr, train_config["momentum"], train_config["weight_decay"])
        tuned, _ = masked_train(result.module, result.variables, structure_masks(result.variables), feed, fit)
        tuned = jax.device_get(tuned)
        save_network(out / "finetune", kind, train_config, tuned, {**info, "finetune": _tuning(config)})
    return {
        **report,
        "macs": {"dense": result.dense_macs, "slim": int(result.macs), "ratio": result.macs / result.dense_macs},
        "params": {"dense": result.dense_params, "slim": int(result.params),
                   "ratio": result.params / result.dense_params},
        "accuracy": {**report["accuracy"], "pruned": pruned,
                     "finetuned": accuracies(result.module, tuned, train_config, config.data_dir)},
        "latency_ms_batch128": latency_ms({"dense": (module, variables), "slim": (result.module, tuned)}, shape, 128),
        "layers": _layers(dense_net, trace(result.module, tuned, shape)),
        "autocompress": {"structure": options.structure, "rounds": options.rounds, "export": _export_note(
            result, dense_net), "purified": {key: sum(s["purified"][key] for s in result.stages if "purified" in s)
                                             for key in ("channels", "macs", "params")}, "stages": result.stages},
    }, out / "finetune"


def markdown(report) -> str:
    """The pruned network's summary and the table of AutoCompress's stages."""
    section = report["autocompress"]
    lines = ["", "## AutoCompress", "",
             f"structure {section['structure']}, {section['rounds']} round(s); export: {section['export']}. MACs and "
             "parameters count the weights kept (columns included); purification removed {channels} channels, "
             "{macs:,.0f} MACs and {params:,.0f} parameters beyond the hard masks.".format(**section["purified"]), "",
             "| stage | structure | budget MACs | MACs | params | purified channels | purified MACs | "
             "purified params | accuracy pruned | retrained |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in section["stages"]:
        budget = "-" if s["budget"]["macs"] is None else f"{s['budget']['macs']:,.0f}"
        if "skipped" in s:
            lines.append(f"| {s['stage']} | {s['structure']} | {budget} | {s['skipped']} |")
            continue
        p = s["purified"]
        lines.append(f"| {s['stage']} | {s['structure']} | {budget} | {s['macs']:,.0f} | "
                     f"{s['params']:,.0f} | {p['channels']} | {p['macs']:,.0f} | {p['params']:,.0f} | "
                     f"{s['pruned_accuracy']:.4f} | {s['retrained_accuracy']:.4f} |")
    return pruned_markdown(report) + "\n".join(lines) + "\n"


register_stage(AUTOCOMPRESS, Stage(check, check_network, run, markdown,
                                   "AutoCompress's rounds of annealing, ADMM structured pruning, purification and "
                                   "retraining (--agent-option structure=filter|column|both, rounds, episodes, "
                                   "admm_epochs, retrain_epochs, learning_rate, momentum, weight_decay, rho, "
                                   "rho_growth, rho_max, admm_interval, and annealing's options)",
                                   ("export", "finetune"), check_resume))
