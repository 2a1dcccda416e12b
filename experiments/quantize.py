"""Test accuracy against packed model size: float32, uniform 8 and 4 bits, searched mixed precision at the size
of uniform 4 bits (each `--methods` entry over `--seeds`), and a pruned network quantized the same way.

Every quantized network gets the same quantization-aware fine-tune (`--qat-epochs` over the first
`--qat-images` training images at `--lr`; 0 epochs: post-training quantization only), then is exported
to a packed file (`agmc_jax.quant.save_packed`) whose size on disk is the size reported. The searched
policies use the bits kind with its defaults (2..8 bits, first and last layers at 8) and a budget equal
to uniform 4 bits' size. Prints a Markdown table (mean and spread over seeds), writes `table.md` and
`results.json` to `--out`; rerunning with the same `--out` resumes searches and reuses finished rows.

    python experiments/quantize.py --workdir agmc_jax/baselines/lenet5_fashion_mnist --out runs/quant_lenet5 \
        --methods ppo,haq --seeds 0,1,2 --episodes 100 --qat-epochs 1
"""
import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from agmc_jax import data
from agmc_jax.data.sources import Source
from agmc_jax.graph import trace
from agmc_jax.networks import evaluate_variables, load_network, mark_trained_quantized
from agmc_jax.quant import FLOAT_BITS, Quantized, save_packed, size_bits, size_model
from agmc_jax.search import search
from agmc_jax.prune import Slimmed
from agmc_jax.train import config_from_dict, config_to_dict, train

from results_io import write_result  # experiments/results_io.py: JSON under experiments/results/


class First(Source):
    """The first `count` examples of a source (the fine-tuning subset)."""

    def __init__(self, source, count):
        self.source, self.count = source, min(count, len(source))

    def __len__(self):
        return self.count

    def get(self, indices):
        return self.source.get(indices)


def uniform_bits(net, width):
    """Every conv and dense kernel at `width` bits."""
    return {layer.kernel_path: width for layer in net.layers}


def variable_count(net):
    """Elements of every variable (parameters and BatchNorm statistics): the float32 size is 32 bits each."""
    return sum(int(np.prod(shape)) for shape in net.shapes)


def uniform_size(net, width):
    """The size in bits of every kernel at `width` bits (the bits kind's size model, nothing pinned)."""
    leaves = [net.paths.index(layer.kernel_path) for layer in net.layers]
    return size_bits(size_model(net.shapes, leaves, {}), [width] * len(leaves))


def quantized_row(name, module, variables, config, bits, args, out):
    """Test accuracy before and after the quantization-aware fine-tune, and the packed file's bytes."""
    path = out / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    quantized = Quantized(module, bits)
    before = evaluate_variables(quantized, variables, config, "test")["accuracy"]
    after = before
    if args.qat_epochs > 0:
        base = config_from_dict(config)
        tuned = dataclasses.replace(base, epochs=args.qat_epochs, learning_rate=args.lr, warmup_epochs=0)
        sources = {"train": First(data.load(base.dataset, "train", base.data_dir), args.qat_images)}
        workdir = out / f"{name}_qat"
        after = train(tuned, workdir, sources=sources, module=quantized, variables=variables)["test_acc"]
        mark_trained_quantized(workdir, config_to_dict(tuned), quantized.bits, isinstance(module, Slimmed))
        variables = load_network(workdir)[1]  # the fine-tuned latent weights
    size = save_packed(out / f"{name}.packed", variables, quantized.bits, overwrite=True)
    row = {"name": name, "bytes": size, "ptq_test_acc": before, "qat_test_acc": after,
           "bits": {"/".join(p[1:-1]): b for p, b in quantized.bits}}
    path.write_text(json.dumps(row, indent=1))
    return row


def spread(values, digits=4):
    values = np.asarray(values, np.float64)
    return f"{values.mean():.{digits}f}" if len(values) == 1 else f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def table(groups, float_bytes):
    lines = ["| network | policy | packed size (bytes) | size vs float32 | test acc, quantized | "
             "test acc, after QAT | runs |", "|---|---|---|---|---|---|---|"]
    for (network, policy), rows in groups.items():
        sizes = [r["bytes"] for r in rows]
        lines.append(f"| {network} | {policy} | {spread(sizes, 0)} | {spread(np.divide(sizes, float_bytes[network]), 3)} "
                     f"| {spread([r['ptq_test_acc'] for r in rows])} | {spread([r['qat_test_acc'] for r in rows])} "
                     f"| {len(rows)} |")
    return "\n".join(lines) + "\n"


def searched_rows(label, module, variables, config, target_size, args, out):
    """One row per method and seed: the searched bit policy at `target_size`, fine-tuned and packed."""
    images, labels = data.load_arrays(config["dataset"], "validation", config["data_dir"], limit=args.reward_images)
    groups = {}
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{label}_{method}_seed{seed}"
            result = search(module, variables, (images, labels), method=method, kind="bits",
                            target_size=target_size, episodes=args.episodes, seed=seed, out=out / name, resume=True,
                            progress=False)
            row = quantized_row(name, module, variables, config, result.env.kind.bit_widths(result.counts), args, out)
            groups.setdefault((label, f"{method} at uniform-4 size"), []).append(
                {**row, "best_reward": result.reward, "size_bits": result.size_bits})
    return groups


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained network")
    parser.add_argument("--pruned", help="also quantize this pruned network (e.g. a compress run's search/finetune)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="ppo,haq")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--reward-images", type=int, default=1000)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--qat-images", type=int, default=55000, help="training images per fine-tuning epoch")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    module, variables, config = load_network(args.workdir)
    net = trace(module, variables, tuple(config["input_shape"]))
    label = config["model"]
    float_bytes = {label: save_packed(out / "float32.packed", variables, {}, overwrite=True)}
    float_test = evaluate_variables(module, variables, config, "test")["accuracy"]
    groups = {(label, "float32"): [{"bytes": float_bytes[label], "ptq_test_acc": float_test,
                                    "qat_test_acc": float_test}]}
    for width in (8, 4):
        groups[(label, f"uniform {width} bits")] = [
            quantized_row(f"uniform{width}", module, variables, config, uniform_bits(net, width), args, out)]
    size4 = uniform_size(net, 4)
    groups.update(searched_rows(label, module, variables, config, size4 / FLOAT_BITS / variable_count(net), args,
                                out))
    if args.pruned:
        pmodule, pvariables, pconfig = load_network(args.pruned)
        pnet = trace(pmodule, pvariables, tuple(pconfig["input_shape"]))
        plabel = f"{label} pruned"
        float_bytes[plabel] = save_packed(out / "pruned_float32.packed", pvariables, {}, overwrite=True)
        groups[(plabel, "float32")] = [{"bytes": float_bytes[plabel],
                                        "ptq_test_acc": evaluate_variables(pmodule, pvariables, pconfig, "test")["accuracy"],
                                        "qat_test_acc": float("nan")}]
        groups.update(searched_rows(plabel, pmodule, pvariables, pconfig,
                                    min(size4 / FLOAT_BITS / variable_count(pnet), 0.99), args, out))
    text = table(groups, float_bytes)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": {" / ".join(k): v for k, v in
                                                                              groups.items()}}, indent=1))
    (out / "table.md").write_text(text)
    write_result("quantize", out.name, {"args": vars(args), "rows": {" / ".join(k): v for k, v in groups.items()}})
    print(text)


if __name__ == "__main__":
    main()
