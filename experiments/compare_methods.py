"""AGMC vs AMC vs random vs uniform on one trained network at one MACs budget.

For each method and seed: a search of `--episodes` episodes on the validation subset; the best
reward after each of `--marks` episodes; then the best policy is slimmed and fine-tuned for the
same `--finetune-epochs`, and its test accuracy reported. Prints a Markdown table (mean and
standard deviation over seeds) and writes `results.json` to `--out`.

    python experiments/compare_methods.py --workdir agmc_jax/baselines/resnet20_fashion_mnist \
        --out runs/compare --episodes 200 --marks 50,100,200 --seeds 0,1,2
"""
import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from agmc_jax import data
from agmc_jax.networks import load_network
from agmc_jax.search import search
from agmc_jax.train import config_from_dict, train


def best_after(history, mark):
    return max(h["reward"] for h in history[:mark])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="agmc,amc,random,uniform")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--marks", default="50,100,200")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--reward-images", type=int, default=1000)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()

    module, variables, config = load_network(args.workdir)
    base = config_from_dict(config)
    images, labels = data.load_arrays(base.dataset, "validation", base.data_dir, limit=args.reward_images)
    marks = [int(m) for m in args.marks.split(",")]
    out = Path(args.out)
    results = []
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            run = out / f"{method}_seed{seed}"
            result = search(module, variables, (images, labels), method=method, target_macs=args.target_macs,
                            episodes=args.episodes, seed=seed, out=run, resume=True)
            slim_module, slim_variables = result.slim()
            tuned = train(dataclasses.replace(base, epochs=args.finetune_epochs, learning_rate=args.lr,
                                              warmup_epochs=0), run / "finetune", module=slim_module,
                          variables=slim_variables)
            history = result.history or [{"reward": result.reward}]
            results.append({"method": method, "seed": seed, "macs_ratio": result.macs / result.net.macs,
                            "best": {m: best_after(history, m) for m in marks},
                            "test_acc": tuned["test_acc"]})
            (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| method | " + " | ".join(f"best reward @{m}" for m in marks) + " | test acc after fine-tune |")
    print("|---" * (len(marks) + 2) + "|")
    for method in args.methods.split(","):
        rows = [r for r in results if r["method"] == method]
        cells = [f"{np.mean([r['best'][m] for r in rows]):.4f} ± {np.std([r['best'][m] for r in rows]):.4f}"
                 for m in marks]
        tests = [r["test_acc"] for r in rows]
        print(f"| {method} | " + " | ".join(cells) + f" | {np.mean(tests):.4f} ± {np.std(tests):.4f} |")


if __name__ == "__main__":
    main()
