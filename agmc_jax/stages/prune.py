"""The prune stage: search keep counts on the network, slim it, fine-tune it; its report section is the
compressed network's MACs, parameters, latency, accuracy and layers (and the re-ranked candidates)."""
import time

from agmc_jax.errors import UsageError
from agmc_jax.latency import latency_ms
from agmc_jax.networks import accuracies, load_network
from agmc_jax.pipeline import check_tuning, finetune, finetune_config, run_search, search_config, search_options
from agmc_jax.report import pruned_markdown
from agmc_jax.stages.registry import Stage, register_stage


def check(config) -> None:
    """The search's settings checked; bit widths are the quantize stage's."""
    if config.kind == "bits":
        raise UsageError("the prune stage prunes; search bit widths with --stages quantize")
    search_config(**search_options(config))


def check_network(config, network, first) -> None:
    """The fine-tune's settings checked against the network's training config."""
    finetune_config(network[2], config.finetune_epochs, config.lr, config.data_dir, data_workers=config.data_workers)


def check_resume(run) -> None:
    """A resumed compression whose fine-tune would be refused after the search (other epochs or learning rate than
    the saved one's) is refused first."""
    config = run.config
    check_tuning(run.out / "search" / "slim", run.out / "search" / "finetune", config.finetune_epochs, config.lr,
                 config.data_dir, config.seed)


def run(run, source, report):
    """search -> slim -> fine-tune in `run.out`/search; returns the report with the prune fields and the fine-tuned
    network's directory."""
    config, out = run.config, run.out
    module, variables, train_config = load_network(source)
    print(f"  search: {config.method}, {config.episodes} episodes", flush=True)
    began = time.perf_counter()
    result = run_search(source, out / "search", **search_options(config, run.resume))
    searched = time.perf_counter() - began
    slim_module, slim_variables, _ = load_network(out / "search" / "slim")
    run.check_later((slim_module, slim_variables, train_config))  # the fine-tune keeps these shapes
    pruned = accuracies(slim_module, slim_variables, train_config, config.data_dir)
    print(f"  fine-tune the slimmed network, {config.finetune_epochs} epoch(s)", flush=True)
    tuned = finetune(out / "search", config.finetune_epochs, config.lr, config.data_dir, config.seed,
                     config.data_workers)
    policy = result.policy()
    shape = tuple(train_config["input_shape"])
    return {
        **report,
        "macs": {"dense": result.net.macs, "slim": policy["macs"], "ratio": policy["macs_ratio"]},
        "params": {"dense": result.net.params, "slim": policy["params"], "ratio": policy["params_ratio"]},
        "accuracy": {**report["accuracy"], "pruned": pruned,
                     "finetuned": {"validation": tuned["val_acc"], "test": tuned["test_acc"]}},
        "latency_ms_batch128": latency_ms({"dense": (module, variables), "slim": (slim_module, slim_variables)},
                                          shape, 128),
        "layers": policy["layers"],
        **({"rerank": policy["rerank"]} if "rerank" in policy else {}),
        "seconds": {"search": searched - result.rerank_seconds, "rerank": result.rerank_seconds,
                    "finetune": tuned.get("seconds")},
    }, out / "search" / "finetune"


def markdown(report) -> str:
    """The pruned network's summary, its layers, the re-ranked candidates and where the time went."""
    return pruned_markdown(report) + rerank_markdown(report.get("rerank", [])) + seconds_markdown(report)


def seconds_markdown(report) -> str:
    """The stage's wall time: the search, its re-rank and the fine-tune ('' for a report without them)."""
    seconds = report.get("seconds")
    if not seconds:
        return ""
    parts = [f"{name} {value:.0f} s" for name, value in seconds.items() if value is not None]
    return f"\nWall time: {', '.join(parts)} (re-rank apart from the search, compilation included).\n"


def rerank_markdown(candidates) -> str:
    """The re-ranked candidates, best (the exported one) first, the uniform rule's among them ('' without)."""
    if not candidates:
        return ""
    return "\n".join(["", "## Re-ranked by a longer masked fine-tune (the first is exported)", "",
                      "| candidate | search reward | fine-tuned top-1 | MACs ratio | params ratio |",
                      "|---|---|---|---|---|"] + [
        f"| {c['name']} | {'-' if c['reward'] is None else format(c['reward'], '.4f')} | {c['finetuned_top1']:.4f} | "
        f"{c['macs_ratio']:.3f} | {c['params_ratio']:.3f} |" for c in candidates]) + "\n"


register_stage("prune", Stage(check, check_network, run, markdown,
                              "search keep ratios per channel group, slim and fine-tune", ("search",), check_resume))
