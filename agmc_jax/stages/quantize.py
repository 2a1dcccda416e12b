"""The quantize stage: search weight bits per layer under a size budget, fine-tune quantization-aware, export a
packed file; its report section is the sizes on disk, the accuracy before and after QAT and the bits per layer."""
from agmc_jax.env import REWARDS, Budget
from agmc_jax.errors import UsageError
from agmc_jax.graph import trace
from agmc_jax.kinds import KINDS
from agmc_jax.networks import accuracies, float_bytes, load_network, mark_trained_quantized
from agmc_jax.pipeline import (check_tuning, finetune_config, forget_other_start, run_search, search_config,
                               search_options)
from agmc_jax.prune.slim import Slimmed
from agmc_jax.quant import save_packed
from agmc_jax.stages.registry import Stage, register_stage
from agmc_jax.train import config_to_dict, train


def quantize_options(config, resume=False) -> dict:
    """`run_search` keyword arguments of the bit-width search."""
    bits = {name: getattr(config, f"quant_{name}") for name in ("min_bit", "max_bit")
            if getattr(config, f"quant_{name}") is not None}
    return {**search_options(config, resume), "method": config.quant_method, "kind": "bits", "target_macs": None,
            "target_params": None, "target_size": config.quant_target_size, "criterion": "l2", "round_to": 1,
            "rerank": 0, "kind_options": bits}


def check(config) -> None:
    """The bit-width search's settings checked; a reward that trains candidates cannot score bit widths."""
    if REWARDS[config.reward].finetunes:
        raise UsageError(f"the quantize stage searches bit widths, which the {config.reward} reward cannot train; "
                         "choose --reward acc (or another) with --stages quantize")
    if config.kind_option and "prune" not in config.stages:
        raise UsageError("--kind-option sets the prune stage's kind; the quantize stage takes --min-bit and --max-bit")
    search_config(**quantize_options(config))


def check_network(config, network, first) -> None:
    """The size budget against the network it quantizes (when that is the input), and QAT's settings."""
    module, variables, train_config = network
    if first:
        env = search_config(**quantize_options(config)).env
        Budget(KINDS["bits"](trace(module, variables, tuple(train_config["input_shape"])), env), env)
    finetune_config(train_config, config.qat_epochs, config.lr, config.data_dir, data_workers=config.data_workers)


def check_resume(run) -> None:
    """A resumed compression whose quantization-aware fine-tune would be refused after the bit-width search (other
    epochs or learning rate than the saved one's) is refused first."""
    config, out = run.config, run.out / "quantize"
    check_tuning(out / "search" / "quantized", out / "qat", config.qat_epochs, config.lr, config.data_dir, config.seed,
                 sparse=False)


def run(run, source, report):
    """bit-width search on the network of `source` -> quantization-aware fine-tune -> packed export, in
    `run.out`/quantize; returns the report with its quantize section and the QAT directory."""
    config, out = run.config, run.out / "quantize"
    print(f"  bit-width search: {config.quant_method}, {config.episodes} episodes", flush=True)
    result = run_search(source, out / "search", **quantize_options(config, run.resume))
    module, variables, train_config = load_network(out / "search" / "quantized")
    quantized = accuracies(module, variables, train_config, config.data_dir)
    print(f"  quantization-aware fine-tune, {config.qat_epochs} epoch(s)", flush=True)
    tuned_config = finetune_config(train_config, config.qat_epochs, config.lr, config.data_dir, seed=config.seed,
                                   data_workers=config.data_workers)
    workdir = out / "qat"
    forget_other_start(workdir, variables)
    tuned = train(tuned_config, workdir, module=module, variables=variables)
    mark_trained_quantized(workdir, config_to_dict(tuned_config), module.bits, isinstance(module.module, Slimmed))
    latent = load_network(workdir)[1]
    packed, partial = out / "model.packed", out / "model.packed.partial"
    partial.unlink(missing_ok=True)  # a write cut short
    size = save_packed(partial, latent, module.bits)
    partial.replace(packed)  # whole or not at all: a resumed run rewrites it
    policy = result.policy()
    return {**report, "quantize": {
        "method": config.quant_method, "bits": policy["bits"],
        "size_bytes": {"float32": float_bytes(variables), "packed": size, "packed_file": str(packed),
                       "ratio": size / float_bytes(variables)},
        "accuracy": {"quantized": quantized, "finetuned": {"validation": tuned["val_acc"], "test": tuned["test_acc"]}},
    }}, workdir


def markdown(report) -> str:
    """Sizes on disk, accuracy before and after QAT, bits per layer."""
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


register_stage("quantize", Stage(check, check_network, run, markdown,
                                 "search weight bits per layer under --target-size, fine-tune quantization-aware "
                                 "and export a packed file", (), check_resume))
