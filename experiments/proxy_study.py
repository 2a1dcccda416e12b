"""Which cheap score predicts a pruned network's accuracy after the standard fine-tune? (issue #22's proxy study)

For each budget, a set of channel policies that meet it: the uniform policy (one keep ratio, channels
rounded to 1), the uniform rule as `agmc compress --method uniform` exports it (`rule`: channels in
multiples of 8, raised to the budget), deliberately skewed ones (thin early or late layers, one thin
stage), random walled policies raised to the budget, and the best policies of AGMC, AMC, annealing and
random searches. Each policy is slimmed (BatchNorm re-estimated on the first 100 validation images, as
`agmc compress` exports it) and given the standard fine-tune of `agmc compress` (one epoch of the training
split, batch 128, SGD lr 0.02 momentum 0.9, cosine to 0, weight decay 5e-4 on kernels, the baseline's data
seed): its test top-1 is the truth. Proxies:

- `bn_top1_N`: top-1 of the exported (BatchNorm re-estimated, not fine-tuned) network on the first N
  validation images, N in {500, 1000, 5000}; `bn_xent_5000`: minus its cross-entropy there;
- `lstsq_top1_1000`: the search's reward with AMC's least-squares refit (criterion lstsq), 1,000 images;
- `ft{k}_top1_N`, `ft{k}_xent_N`: the same network after the first k steps of that very fine-tune, its
  BatchNorm re-estimated again, for k in {8, 32, 128} (the masked fine-tune a compiled reward runs is the
  same computation at full size: masked and slimmed networks compute the same function);
- `capacity`: the fraction of the other resource kept (parameters at a MACs budget, MACs at a
  parameter budget), a zero-cost reference.

Each proxy's cost per policy is reported in seconds measured here (the slimmed network on this CPU) and in
dense evaluations of 1,000 images (what the masked, full-size computation inside a search costs: a
training step of 128 images counted as 3 x 128 forward images). Kendall tau and Spearman rho against the
truth come with 95% bootstrap intervals (policies resampled). The uniform policy, the rule and the
`--replicate-best` policies of highest truth so far are fine-tuned again with other data seeds
(`NAME_seedS`, `replicate_of` in the record): the truth's own noise, and whether the best policies found
beat the rule by more than it.

Resumable: every policy writes `OUT/<budget>/<policy>.json` when it is done and is skipped when that file
exists; searches checkpoint under `--work`. `--report` renders the table and scatter plots from the JSON.

    python experiments/proxy_study.py --workdir agmc_jax/baselines/resnet20_fashion_mnist \
        --out experiments/results/proxy_study --work runs/proxy_study --budgets macs=0.25,params=0.1
    python experiments/proxy_study.py --workdir agmc_jax/baselines/resnet20_fashion_mnist \
        --out experiments/results/proxy_study --work runs/proxy_study --budgets params=0.1 --replicate-best 3
    python experiments/proxy_study.py --out experiments/results/proxy_study --report docs/proxy_study.md
"""
import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from agmc_jax import data
from agmc_jax.env import EnvConfig, Environment
from agmc_jax.graph import trace
from agmc_jax.kinds import KINDS
from agmc_jax.networks import load_network
from agmc_jax.pipeline import finetune_config
from agmc_jax.prune.batchnorm import recalibrate
from agmc_jax.search import search
from agmc_jax.train import (data_mesh, evaluate_source, global_batch, make_eval_step, make_train_step,
                            optimizer_spec, state_from_variables)

STEPS = (8, 32, 128)
SEARCHES = ("agmc", "amc", "annealing", "random")
SLOPES = (-0.6, -0.3, 0.3, 0.6)  # keep ratio rising with depth (thin early layers) for positive slopes


class Searched(NamedTuple):
    """A policy to take from a search: the `rank`-th best distinct one of `method`'s."""
    method: str
    rank: int


class Replicate(NamedTuple):
    """A policy already studied (`counts`, record `of`), fine-tuned again with data seed `seed`."""
    of: str
    counts: list
    seed: int


def is_replicate(record) -> bool:
    """Whether a record is a fine-tune replicate of another policy (not a policy of its own)."""
    return "replicate_of" in record


def parse_budget(text):
    """'macs=0.25' -> {'target_macs': 0.25}."""
    resource, value = text.split("=")
    return {f"target_{resource}": float(value)}


class Study:
    """The trained network, its data, and one environment per budget."""

    def __init__(self, args):
        self.args = args
        self.module, self.variables, self.config = load_network(args.workdir)
        dataset, data_dir = self.config["dataset"], self.config["data_dir"]
        self.validation = data.load_arrays(dataset, "validation", data_dir, limit=5000)
        self.train = data.load(dataset, "train", data_dir)
        self.test = data.load(dataset, "test", data_dir)
        self.tune = finetune_config(self.config, args.finetune_epochs, args.lr)
        self.mesh = data_mesh()
        self.out, self.work = Path(args.out), Path(args.work)
        self.net = trace(self.module, self.variables, self.validation[0][:1])
        self.dense_eval_seconds = self._dense_eval_seconds()

    def env(self, budget, count=1000, criterion="l2"):
        config = EnvConfig(**parse_budget(budget), round_to=1, criterion=criterion, fill=True)
        return Environment(KINDS["channels"](self.net, config), self.variables, *(a[:count] for a in self.validation),
                           config, self.mesh)

    def _dense_eval_seconds(self):
        """Seconds of one evaluation of the dense network on 1,000 images (the search's unit of cost)."""
        apply = jax.jit(lambda v, x: self.module.apply(v, x, **self.net.call_kwargs))
        images = self.validation[0][:1000]
        jax.block_until_ready(apply(self.variables, images[:500]))
        began = time.perf_counter()
        for part in (images[:500], images[500:]):
            jax.block_until_ready(apply(self.variables, part))
        return time.perf_counter() - began

    # ----- policies -------------------------------------------------------------------------------
    def policies(self, budget):
        """[(name, counts or a search to run)] of one budget, cheap ones first."""
        env = self.env(budget)
        sizes = env.sizes.astype(np.float64)
        depth = np.array([min(l.op_index for l in layers) for layers in env.kind.step_layers], np.float64)
        depth = (depth - depth.min()) / max(np.ptp(depth), 1.0)
        stage = np.searchsorted(np.unique(sizes), sizes)  # ResNet-20: widths 16 / 32 / 64 are its stages
        items = [("uniform", env.uniform_counts())]
        items += [(f"slope{s:+.1f}", self._profile(env, s * (depth - 0.5))) for s in SLOPES]
        items += [(f"thin_stage{k}", self._profile(env, np.where(stage == k, -0.25, 0.0)))
                  for k in range(int(stage.max()) + 1)]
        rng = np.random.default_rng(self.args.seed)
        filled = jax.jit(env.filled)
        for i in range(self.args.random):
            counts = env.policy_counts(rng.uniform(size=env.steps))
            items.append((f"random{i:02d}", np.asarray(filled(jnp.asarray(counts, jnp.int32)))))
        items += [("rule", Searched("uniform", 0))]
        items += [(f"{method}_best{rank}", Searched(method, rank)) for method in SEARCHES
                  for rank in range(self.args.top)]
        return env, items + self.replicates(budget, items)

    def replicates(self, budget, items) -> list:
        """Items fine-tuning the uniform policy, the rule and the `--replicate-best` policies of highest truth
        (among those done so far) again with data seeds 1..`--replicates`."""
        done = {r["name"]: r for r in load_records(self.out).get(budget, []) if not is_replicate(r)}
        best = sorted((n for n in done if n not in ("uniform", "rule")), key=lambda n: -done[n]["truth"])
        names = ["uniform", "rule", *best[:self.args.replicate_best]]
        counts = {n: done[n]["counts"] for n in names if n in done} | {"uniform": list(items[0][1])}
        return [(f"{n}_seed{s}", Replicate(n, counts[n], s)) for n in names if n in counts
                for s in range(1, self.args.replicates + 1)]

    @staticmethod
    def _profile(env, offsets):
        """Counts keeping ratio c + offsets[t] per step, c the largest that meets the budget."""
        def counts(c):
            ratio = np.clip(c + offsets, env.config.lbound, env.config.rbound)
            return np.maximum(env.min_counts, np.floor(ratio * env.sizes + 1e-6).astype(np.int64))

        low, high = 0.0, 2.0
        for _ in range(50):
            middle = (low + high) / 2
            low, high = (middle, high) if env.feasible(counts(middle)) else (low, middle)
        return counts(low)

    def searched(self, budget, method, rank):
        """The `rank`-th best distinct policy (by reward) of a search of `method` at `budget` (resumable); the
        uniform rule with `agmc compress`'s own rounding."""
        rounding = {} if method == "uniform" else {"round_to": 1}
        result = search(self.module, self.variables, tuple(a[:1000] for a in self.validation), method=method,
                        episodes=self.args.episodes, seed=0, out=self.work / budget / f"search_{method}",
                        resume=True, progress=False, fill=True, **rounding, **parse_budget(budget))
        counts = np.array([r["keep"] for r in result.history]) * result.env.sizes
        order = np.argsort([-r["reward"] for r in result.history], kind="stable")
        distinct = []
        for e in order:
            policy = np.round(counts[e]).astype(np.int64)
            if not any(np.array_equal(policy, d) for d in distinct):
                distinct.append(policy)
        return distinct[rank]

    # ----- proxies and the truth ----------------------------------------------------------------
    def _scores(self, module, variables, count):
        """(top-1, minus mean cross-entropy, seconds) on the first `count` validation images."""
        apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
        x, y = (a[:count] for a in self.validation)
        jax.block_until_ready(apply(variables, x[:500]))  # compiled outside the timing
        began = time.perf_counter()
        logits = np.concatenate([np.asarray(apply(variables, x[i:i + 500])) for i in range(0, count, 500)])
        seconds = time.perf_counter() - began
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return float(np.mean(np.argmax(logits, -1) == y)), -float(xent), seconds

    def _recalibrated(self, module, variables):
        return jax.device_get(recalibrate(module, variables, self.validation[0][:100], train=False))

    def run(self, env, lstsq, name, counts, seed=None):
        """Every proxy and the truth of one policy."""
        began = time.perf_counter()
        module, variables = env.export(counts)
        ratios = env.ratios(counts)
        proxies, seconds, units = {}, {}, {}
        for count in (500, 1000, 5000):
            top1, xent, spent = self._scores(module, variables, count)
            proxies[f"bn_top1_{count}"], seconds[f"bn_top1_{count}"], units[f"bn_top1_{count}"] = \
                top1, spent, (count + 100) / 1000
        proxies["bn_xent_5000"], seconds["bn_xent_5000"], units["bn_xent_5000"] = xent, spent, 5.1
        lstsq.accuracy(counts[None])
        start = time.perf_counter()
        proxies["lstsq_top1_1000"] = float(lstsq.accuracy(counts[None])[0])
        seconds["lstsq_top1_1000"] = time.perf_counter() - start
        units["lstsq_top1_1000"] = seconds["lstsq_top1_1000"] / self.dense_eval_seconds
        other = "params_ratio" if env.config.target_macs is not None else "macs_ratio"
        proxies["capacity"], seconds["capacity"], units["capacity"] = ratios[other], 0.0, 0.0
        truth = self.finetune(module, variables, proxies, seconds, units, seed)
        record = {"name": name, "counts": [int(c) for c in counts], "keep": (counts / env.sizes).round(4).tolist(),
                  **ratios, "proxies": proxies, "seconds": seconds, "dense_evals": units, **truth,
                  "seconds_total": time.perf_counter() - began}
        return record

    def finetune(self, module, variables, proxies, seconds, units, seed=None):
        """The standard fine-tune of `agmc compress` (train.train's step, data order and schedule), scoring the
        proxies after its first k steps; returns the truth (test and validation top-1 after it)."""
        tune = self.tune if seed is None else dataclasses.replace(self.tune, seed=seed)
        steps = data.steps_per_epoch(self.train, tune.batch_size)
        spec = optimizer_spec(tune, steps)
        step_fn = make_train_step(self.mesh, module, spec)
        replicated = NamedSharding(self.mesh, P())
        state = jax.device_put(state_from_variables(jax.tree.map(jnp.array, variables), tune), replicated)
        done, trained = 0, 0.0
        for epoch in range(tune.epochs):
            for batch in data.batches(self.train, tune.dataset, tune.batch_size, train=True, seed=tune.seed,
                                      epoch=epoch):
                began = time.perf_counter()
                state, _ = step_fn(state, global_batch(batch, self.mesh))
                jax.block_until_ready(state.params)
                trained += time.perf_counter() - began if done else 0.0  # the first step compiles
                done += 1
                if seed is None and done in STEPS:
                    current = {"params": state.params, "batch_stats": state.batch_stats}
                    start = time.perf_counter()
                    current = self._recalibrated(module, current)
                    recalibration = time.perf_counter() - start
                    for count in (1000, 5000):
                        top1, xent, spent = self._scores(module, current, count)
                        for what, value in (("top1", top1), ("xent", xent)):
                            key = f"ft{done}_{what}_{count}"
                            proxies[key] = value
                            seconds[key] = trained * done / max(done - 1, 1) + recalibration + spent
                            units[key] = done * 3 * tune.batch_size / 1000 + (100 + count) / 1000
        final = {"params": state.params, "batch_stats": state.batch_stats}
        eval_fn = make_eval_step(self.mesh, module)
        test = evaluate_source(final, eval_fn, self.test, tune, self.mesh, tune.batch_size)
        val = evaluate_source(final, eval_fn, self.validation_source(), tune, self.mesh, tune.batch_size)
        return {"truth": test["accuracy"], "truth_validation": val["accuracy"], "finetune_steps": done,
                "finetune_seed": tune.seed, "seconds_finetune": trained * done / max(done - 1, 1)}

    def validation_source(self):
        return data.load(self.config["dataset"], "validation", self.config["data_dir"])

    # ----- the study -----------------------------------------------------------------------------
    def main(self):
        """Passes over the plan until one writes nothing: a pass's new truths can name new policies to replicate."""
        budgets = self.args.budgets.split(",")
        lstsq = {b: self.env(b, 1000, "lstsq") for b in budgets}
        while self.study(budgets, lstsq):
            pass

    def study(self, budgets, lstsq) -> bool:
        """One pass over every budget's policies; whether it wrote a record."""
        plans = {b: self.policies(b) for b in budgets}
        longest = max(len(items) for _, items in plans.values())
        wrote = False
        for i in range(longest):  # round robin over budgets: an interrupted study has every budget
            for budget in budgets:
                env, items = plans[budget]
                if i >= len(items):
                    continue
                name, what = items[i]
                path = self.out / budget / f"{name}.json"
                if path.exists():
                    continue
                seed, extra = None, {}
                if isinstance(what, Replicate):
                    counts, seed, extra = what.counts, what.seed, {"replicate_of": what.of}
                elif isinstance(what, Searched):
                    counts = self.searched(budget, *what)
                else:
                    counts = what
                record = self.run(env, lstsq[budget], name, np.asarray(counts, np.int64), seed)
                record.update(**extra, budget=budget, machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
                              f"{jax.devices()[0].platform}", date=time.strftime("%Y-%m-%d"),
                              dense_eval_seconds=self.dense_eval_seconds)
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".partial")
                partial.write_text(json.dumps(record, indent=1))
                partial.replace(path)
                wrote = True
                print(f"{budget} {name}: MACs {record['macs_ratio']:.3f} params {record['params_ratio']:.3f} "
                      f"bn1000 {record['proxies']['bn_top1_1000']:.3f} truth {record['truth']:.4f} "
                      f"({record['seconds_total'] / 60:.1f} min)", flush=True)
        return wrote


# ----- analysis ----------------------------------------------------------------------------------
def rank_correlations(x, y, samples=2000, seed=0):
    """Kendall tau and Spearman rho of x against y, each with a 95% bootstrap interval (pairs resampled)."""
    from scipy import stats

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    point = {"kendall": stats.kendalltau(x, y)[0], "spearman": stats.spearmanr(x, y)[0]}
    draws = {"kendall": [], "spearman": []}
    for _ in range(samples):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(x[pick]) == 0 or np.ptp(y[pick]) == 0:
            continue
        draws["kendall"].append(stats.kendalltau(x[pick], y[pick])[0])
        draws["spearman"].append(stats.spearmanr(x[pick], y[pick])[0])
    return {name: (float(point[name]), *np.nanpercentile(draws[name], [2.5, 97.5]).tolist()) for name in point}


def load_records(out):
    """{budget: [policy records]} of a study's output folder; fine-tune replicates apart."""
    budgets = {}
    for path in sorted(Path(out).glob("*/*.json")):
        record = json.loads(path.read_text())
        budgets.setdefault(record["budget"], []).append(record)
    return budgets


def seeds_table(records) -> list:
    """Markdown lines: each replicated policy's truth over its data seeds (mean ± std, population), best first."""
    seeds = {}
    for r in records:
        seeds.setdefault(r.get("replicate_of", r["name"]), []).append(r["truth"])
    rows = sorted(((np.mean(t), np.std(t), len(t), n) for n, t in seeds.items() if len(t) > 1), reverse=True)
    if not rows:
        return []
    return ["The truth's own noise: policies fine-tuned again with other data seeds (test top-1 %, mean ± std):", "",
            "| policy | seeds | truth % |", "|---|---|---|",
            *[f"| `{n}` | {k} | {100 * m:.2f} ± {100 * d:.2f} |" for m, d, k, n in rows], ""]


def report(out, target):
    """The Markdown table of every proxy's rank correlations and cost, and a scatter plot per budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(target)
    lines = ["# Proxy study: which score predicts the accuracy after fine-tuning", "",
             "Generated by `python experiments/proxy_study.py --out experiments/results/proxy_study --report "
             f"{target}` from the JSON records in `{out}` (the study itself: the command in the script's docstring).",
             ""]
    for budget, records in load_records(out).items():
        policies = [r for r in records if not is_replicate(r)]
        truth = np.array([r["truth"] for r in policies])
        first = policies[0]
        named = {r["name"]: r for r in policies}
        lines += [f"## {budget}: {len(policies)} policies", "",
                  f"Machine: {first['machine']}; dates {min(r['date'] for r in records)} to "
                  f"{max(r['date'] for r in records)}. Truth: test top-1 after the standard fine-tune "
                  f"({first['finetune_steps']} steps): mean {100 * truth.mean():.2f}%, range "
                  f"{100 * truth.min():.2f}-{100 * truth.max():.2f}%"
                  + "".join(f"; {label} {100 * named[n]['truth']:.2f}% (rank "
                            f"{1 + int(np.sum(truth > named[n]['truth']))} of {len(truth)})"
                            for n, label in (("uniform", "the uniform policy (one keep ratio)"),
                                             ("rule", "the rule as `agmc compress --method uniform` exports it"))
                            if n in named)
                  + ".", "", *seeds_table(records),
                  "| proxy | Kendall tau [95% CI] | Spearman rho [95% CI] | picks (its best policy's truth %) | "
                  "seconds per policy here | dense evaluations per policy |", "|---|---|---|---|---|---|"]
        names = list(first["proxies"])
        rows = []
        for name in names:
            values = np.array([r["proxies"][name] for r in policies])
            corr = rank_correlations(values, truth)
            rows.append((corr["kendall"][0], name, corr, truth[int(np.argmax(values))],
                         np.mean([r["seconds"][name] for r in policies]),
                         np.mean([r["dense_evals"][name] for r in policies])))
        for _, name, corr, picked, seconds, units in sorted(rows, key=lambda row: -row[0]):
            lines.append(f"| `{name}` | {corr['kendall'][0]:.2f} [{corr['kendall'][1]:.2f}, {corr['kendall'][2]:.2f}] | "
                         f"{corr['spearman'][0]:.2f} [{corr['spearman'][1]:.2f}, {corr['spearman'][2]:.2f}] | "
                         f"{100 * picked:.2f} | {seconds:.2f} | {units:.1f} |")
        shown = ["bn_top1_1000", "lstsq_top1_1000", "ft32_top1_1000", "ft128_top1_5000"]
        figure, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6))
        for axis, name in zip(axes, shown):
            values = np.array([r["proxies"].get(name, np.nan) for r in policies])
            for group, marker in (("uniform", "*"), ("rule", "P"), ("slope", "^"), ("thin", "v"), ("random", "o"), ("best", "s")):
                chosen = [i for i, r in enumerate(policies) if group in r["name"]]
                axis.scatter(values[chosen], 100 * truth[chosen], marker=marker, label=group, s=80 if group == "uniform" else 25)
            axis.set_xlabel(name)
            axis.set_ylabel("test % after fine-tune")
        axes[0].legend(fontsize=7)
        figure.suptitle(f"ResNet-20, Fashion-MNIST, {budget}")
        figure.tight_layout()
        image = target.parent / f"proxy_study_{budget.replace('=', '_')}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(image, dpi=90)
        plt.close(figure)
        lines += ["", f"![{budget}]({image.name})", ""]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="agmc_jax/baselines/resnet20_fashion_mnist")
    parser.add_argument("--out", default="experiments/results/proxy_study", help="one JSON record per policy")
    parser.add_argument("--work", default="runs/proxy_study", help="searches' checkpoints")
    parser.add_argument("--budgets", default="macs=0.25,params=0.1")
    parser.add_argument("--random", type=int, default=16, help="random walled policies per budget")
    parser.add_argument("--top", type=int, default=2, help="best distinct policies taken from each search")
    parser.add_argument("--episodes", type=int, default=60, help="episodes of each search")
    parser.add_argument("--replicates", type=int, default=2,
                        help="extra fine-tune seeds of the uniform policy, the rule and the --replicate-best")
    parser.add_argument("--replicate-best", type=int, default=0,
                        help="policies of highest truth (so far) fine-tuned again with --replicates seeds")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", help="render the table and plots from --out to this Markdown file, then stop")
    args = parser.parse_args()
    if args.report:
        report(args.out, args.report)
    else:
        Study(args).main()


if __name__ == "__main__":
    main()
