"""AutoCompress against annealing alone, AGMC, AMC and uniform on one trained network (issue #13's experiment).

Main table: for each budget (`macs=0.5`: half the MACs; `params=0.1`: ten times fewer parameters), method
and seed, the network each method makes (AutoCompress: rounds of annealing, ADMM, purification and
retraining, filter structure; the others: a search on the validation subset, then slimming), then the
same fine-tune for every method (`--finetune-steps` SGD steps at `--lr`, cosine, every pruned weight
fixed), tested on the whole test split. MACs and parameters count the weights left non-zero.

Ultra-high regime (`--ultra`): AutoCompress (filter then column stages) at each parameter budget against
uniform magnitude pruning (one keep ratio of the weights in every layer) given the same number of
training steps in all (AutoCompress's ADMM and retraining plus the fine-tune); the largest reduction
within one point of the dense test accuracy.

Every run writes `OUT/NAME/result.json` when it finishes and its search or stages checkpoint as they go:
rerunning with the same arguments skips finished runs and resumes interrupted ones. Runs go seed by seed,
so an interrupted experiment has whole seeds. Prints Markdown tables and writes them to `OUT/table.md`.

    python experiments/compare_autocompress.py --workdir agmc_jax/baselines/resnet20_fashion_mnist \
        --out runs/autocompress --seeds 0,1,2 --budgets macs=0.5,macs=0.25,params=0.1 --ultra 0.25,0.125,0.0625
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import numpy as np

from agmc_jax import data
from agmc_jax.autocompress import AutoCompressConfig, autocompress, structure_masks, training_feed
from agmc_jax.env import EnvConfig
from agmc_jax.graph import trace
from agmc_jax.networks import evaluate_variables, load_network
from agmc_jax.prune.admm import Feed, FitConfig, masked_train
from agmc_jax.prune.purify import sparse_cost
from agmc_jax.search import search

from results_io import write_result  # experiments/results_io.py: JSON under experiments/results/

METHODS = ("autocompress", "annealing", "agmc", "amc", "uniform")


def limited(feed: Feed, steps: int) -> Feed:
    """The first `steps` batches of each of `feed`'s epochs: a training phase of a fixed number of steps."""
    return Feed(lambda epoch: itertools.islice(feed.batches(epoch), steps), min(steps, feed.steps))


def parse_budget(text):
    """'macs=0.5' -> {'target_macs': 0.5}."""
    resource, value = text.split("=")
    return {f"target_{resource}": float(value)}


def cost(module, variables, dense, image):
    """(MACs, parameters) of the weights left non-zero, as fractions of the dense network's."""
    macs, params = sparse_cost(trace(module, variables, image), structure_masks(variables))
    return macs / dense.macs, params / dense.params


class Experiment:
    """The trained network, its data and the settings every run shares."""

    def __init__(self, args):
        self.args = args
        self.module, self.variables, self.config = load_network(args.workdir)
        self.dataset, self.data_dir = self.config["dataset"], self.config["data_dir"]
        self.validation = data.load_arrays(self.dataset, "validation", self.data_dir, limit=args.reward_images)
        self.train = data.load(self.dataset, "train", self.data_dir)
        self.dense = trace(self.module, self.variables, self.validation[0][:1])
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def feed(self, seed, steps):
        return limited(training_feed(self.train, self.dataset, self.config["batch_size"], seed), steps)

    def fit(self):
        return FitConfig(1, self.args.lr, self.config["momentum"], self.config["weight_decay"])

    def test(self, module, variables):
        return evaluate_variables(module, variables, self.config, "test")["accuracy"]

    def autocompress(self, budget, seed, structure, rounds, out):
        """AutoCompress's network and its training steps before the fine-tune."""
        args = self.args
        config = AutoCompressConfig(structure=structure, rounds=rounds, episodes=args.episodes, admm_epochs=1,
                                    retrain_epochs=1, learning_rate=args.lr,
                                    admm_interval=max(1, args.admm_steps // args.admm_updates))
        result = autocompress(self.module, self.variables, self.feed(seed, args.admm_steps), self.validation,
                              budget.get("target_macs"), budget.get("target_params"), config, seed,
                              out=out / "autocompress", resume=True, round_to=args.round_to)
        trained = sum(2 * args.admm_steps for s in result.stages if "skipped" not in s)
        return result.module, result.variables, trained, result.stages

    def searched(self, method, budget, seed, out, kind=None, **env_options):
        """A search's exported network (slimmed channels, or sparse weights for `kind='weights'`)."""
        result = search(self.module, self.variables, self.validation, method=method, episodes=self.args.episodes,
                        seed=seed, out=out / "search", resume=True, progress=False, kind=kind,
                        round_to=self.args.round_to, **budget, **env_options)
        module, variables = result.slim()
        return module, variables, 0, {"reward": result.reward, "accuracy": result.accuracy}

    def run(self, name, make, finetune_steps, seed):
        """Make a network, fine-tune it with every zero fixed, test it; cached in OUT/NAME/result.json."""
        path = self.out / name / "result.json"
        if path.exists():
            return json.loads(path.read_text())
        start = time.perf_counter()
        module, variables, trained, detail = make(self.out / name)
        made = time.perf_counter() - start
        macs, params = cost(module, variables, self.dense, self.validation[0][:1])
        pruned = self.test(module, variables)
        tuned, _ = masked_train(module, variables, structure_masks(variables), self.feed(seed, finetune_steps),
                                self.fit())
        tuned = jax.device_get(tuned)
        record = {"name": name, "seed": seed, "macs": macs, "params": params, "pruned_test": pruned,
                  "test": self.test(module, tuned), "trained_before": trained, "finetune_steps": finetune_steps,
                  "seconds_make": made, "seconds": time.perf_counter() - start, "detail": detail}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, default=float))
        write_result("compare_autocompress", name, {**record, "args": vars(self.args)})  # for render_docs.py
        print(f"{name}: MACs {macs:.3f}, params {params:.3f}, test {pruned:.4f} -> {record['test']:.4f} "
              f"({record['seconds'] / 60:.1f} min)", flush=True)
        return record

    def main_run(self, method, budget_text, seed):
        budget = parse_budget(budget_text)
        if method == "autocompress":
            def make(out):
                return self.autocompress(budget, seed, "filter", self.args.rounds, out)
        else:
            def make(out):
                return self.searched(method, budget, seed, out)
        return self.run(f"{budget_text}/{method}_seed{seed}", make, self.args.finetune_steps, seed)

    def ultra_runs(self, target, seed):
        budget = {"target_params": target}
        ours = self.run(f"ultra/autocompress_{target}_seed{seed}",
                        lambda out: self.autocompress(budget, seed, "both", 1, out), self.args.finetune_steps, seed)
        steps = self.args.finetune_steps + ours["trained_before"]
        theirs = self.run(f"ultra/uniform_magnitude_{target}_seed{seed}",
                          lambda out: self.searched("uniform", budget, seed, out, kind="weights",
                                                    lbound=min(EnvConfig().lbound, target / 2)), steps, seed)
        return ours, theirs

    def dense_test(self):
        path = self.out / "dense.json"
        if not path.exists():
            path.write_text(json.dumps({"test": self.test(self.module, self.variables)}))
        return json.loads(path.read_text())["test"]


def spread(values):
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def main_table(records, dense):
    lines = [f"Dense test accuracy {100 * dense:.2f}%. Mean ± standard deviation over seeds (n per row).", "",
             "| budget | method | n | MACs kept % | params kept % | test % before fine-tune | test % after fine-tune | "
             "training steps before fine-tune | minutes per run |", "|---" * 9 + "|"]
    for (budget, method), rows in records.items():
        lines.append(f"| {budget} | {method} | {len(rows)} | {spread([r['macs'] for r in rows])} | "
                     f"{spread([r['params'] for r in rows])} | {spread([r['pruned_test'] for r in rows])} | "
                     f"{spread([r['test'] for r in rows])} | {rows[0]['trained_before']} | "
                     f"{np.mean([r['seconds'] for r in rows]) / 60:.1f} |")
    return "\n".join(lines) + "\n"


def ultra_table(pairs, dense):
    lines = ["| params budget | AutoCompress params kept % | its test % | uniform magnitude params kept % | "
             "its test % | training steps each |", "|---" * 6 + "|"]
    best = {"AutoCompress": None, "uniform magnitude": None}
    for target, (ours, theirs) in pairs:
        lines.append(f"| {target} | {100 * ours['params']:.2f} | {100 * ours['test']:.2f} | "
                     f"{100 * theirs['params']:.2f} | {100 * theirs['test']:.2f} | "
                     f"{theirs['finetune_steps']} |")
        for label, record in (("AutoCompress", ours), ("uniform magnitude", theirs)):
            if record["test"] >= dense - 0.01:
                best[label] = max(best[label] or 0.0, 1 / record["params"])
    summary = "; ".join(f"{label}: " + ("none of the budgets" if factor is None else f"{factor:.1f}x fewer parameters")
                        for label, factor in best.items())
    return "\n".join(lines) + f"\n\nLargest reduction within one point of the dense test accuracy: {summary}.\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="macs=0.5,macs=0.25,params=0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ultra", default="", help="parameter budgets of the ultra-high sweep, e.g. 0.25,0.125")
    parser.add_argument("--episodes", type=int, default=40, help="search episodes (AutoCompress: per stage)")
    parser.add_argument("--reward-images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="AutoCompress rounds in the main table")
    parser.add_argument("--admm-steps", type=int, default=100, help="AutoCompress's ADMM and retraining steps a stage")
    parser.add_argument("--admm-updates", type=int, default=4, help="ADMM Z/U updates (rho x1.3 each) per ADMM phase")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--round-to", type=int, default=1,
                        help="channel multiples (default exact counts: the library's default, multiples of 8 for "
                             "groups of 16+ channels, leaves ResNet-20's 16-channel groups only 8 or 16)")
    args = parser.parse_args()

    experiment = Experiment(args)
    dense = experiment.dense_test()
    records = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for budget in args.budgets.split(","):
            for method in args.methods.split(","):
                records.setdefault((budget, method), []).append(experiment.main_run(method, budget, seed))
    text = "## Main\n\n" + main_table(records, dense)
    if args.ultra:
        pairs = [(t, experiment.ultra_runs(float(t), 0)) for t in args.ultra.split(",")]
        text += "\n## Ultra-high\n\n" + ultra_table(pairs, dense)
    (experiment.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
