"""The registered channel methods (AGMC, AMC, random, uniform, ...) on one trained network at one MACs budget.

For each method and seed: a search of `--episodes` episodes scored on the validation subset; the
best reward after each of `--marks` episodes; the accuracy of the best policy, pruned and not
fine-tuned, on the whole validation split (the reward subset is small: its maximum over many
policies is biased upwards); then that policy slimmed and fine-tuned for the same
`--finetune-epochs` at the same learning rate, and its validation and test accuracy. Prints a
Markdown table (mean and standard deviation over seeds), writes it to `--out/table.md` and
everything measured to `--out/results.json`. Rerunning with the same `--out` resumes finished and
interrupted searches and fine-tunes (a finished fine-tune is only re-tested).

    python experiments/compare_methods.py --workdir agmc_jax/baselines/resnet20_fashion_mnist \
        --out runs/compare --episodes 200 --marks 50,100,200 --seeds 0,1,2 --reward-images 1000
"""
import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from agmc_jax import data
from agmc_jax.networks import evaluate_variables, load_network
from agmc_jax.agents import parse_options
from agmc_jax.search import METHODS, describe_methods, get_method, search
from agmc_jax.train import config_from_dict, train

from results_io import write_result  # experiments/results_io.py: JSON under experiments/results/


def best_after(history, mark):
    """The best reward among the first `mark` episodes (a one-shot method has one)."""
    return max(h["reward"] for h in history[:mark])


def spread(values):
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def table(results, marks):
    """The Markdown table: per method, mean and spread over seeds of each measure."""
    columns = [f"best reward @{m}" for m in marks] + [
        "its pruned val acc", "MACs kept", "fine-tuned val acc", "fine-tuned test acc"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, rows in results.items():
        cells = [spread([r["best"][str(m)] for r in rows]) for m in marks]
        cells += [spread([r[key] for r in rows]) for key in ("pruned_val_acc", "macs_ratio", "val_acc", "test_acc")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finetuned(slim_module, slim_variables, base, args, workdir):
    """Validation and test accuracy of a slimmed policy after `--finetune-epochs` (NaN for 0)."""
    if args.finetune_epochs == 0:
        return {"val_acc": float("nan"), "test_acc": float("nan")}
    summary = train(dataclasses.replace(base, epochs=args.finetune_epochs, learning_rate=args.lr, warmup_epochs=0),
                    workdir, module=slim_module, variables=slim_variables)
    return {"val_acc": summary["val_acc"], "test_acc": summary["test_acc"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS.values() if m.kind.unit == "channels"),
                        help="registered methods, comma-separated: " + describe_methods())
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--marks", default="50,100,200")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--reward-images", type=int, default=1000)
    parser.add_argument("--finetune-epochs", type=int, default=1, help="0: report the policies unfine-tuned")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="BatchNorm re-estimation in the reward (on by default, as in `agmc search`)")
    parser.add_argument("--sigma-decay", type=float, default=None,
                        help="DDPG exploration noise factor per episode after warm-up (default 0.95, AMC's)")
    parser.add_argument("--agent-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a field of the agents' configs, given to every method whose agent has it")
    args = parser.parse_args()

    module, variables, config = load_network(args.workdir)
    base = config_from_dict(config)
    images, labels = data.load_arrays(base.dataset, "validation", base.data_dir, limit=args.reward_images)
    marks = [int(m) for m in args.marks.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    options = {**({} if args.sigma_decay is None else {"sigma_decay": args.sigma_decay}),
               **parse_options(args.agent_option)}
    for method in args.methods.split(","):
        chosen = get_method(method)
        seeds = [0] if chosen.rule is not None else [int(s) for s in args.seeds.split(",")]
        fields = () if chosen.agent is None else chosen.agent.config._fields
        for seed in seeds:
            name = f"{method}_seed{seed}"
            result = search(module, variables, (images, labels), method=method, target_macs=args.target_macs,
                            episodes=args.episodes, seed=seed, out=out / name, resume=True,
                            recalibrate_bn=args.recalibrate_bn,
                            agent_options={k: v for k, v in options.items() if k in fields})
            slim = result.slim()
            results.setdefault(method, []).append(
                {"seed": seed, "best": {str(m): best_after(result.history, m) for m in marks},
                 "macs_ratio": result.macs / result.net.macs, "keep": result.keep.round(4).tolist(),
                 "pruned_val_acc": evaluate_variables(*slim, config, "validation")["accuracy"],
                 **finetuned(*slim, base, args, out / f"{name}_finetune")})
            (out / "results.json").write_text(json.dumps({"args": vars(args), "searches": results}, indent=1))
            write_result("compare_methods", out.name, {"args": vars(args), "searches": results})  # render_docs.py
    text = table(results, marks)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
