"""Issue #22's experiment: what `agmc compress` gives against the uniform rule, AMC, random search and annealing.

For each budget, seed and method, one `agmc_jax.compress` of the trained network (search, slim, the standard
fine-tune of `agmc compress`: the same for every method), the test accuracy after it, the wall time of the
search (re-rank included, reported apart from the fine-tune) and the SGD steps the search trained (finetuned
reward and re-rank). "default" is `agmc compress` with its defaults plus `--default` (JSON of CompressConfig
fields: candidate defaults under test); the others are `--method NAME` with the same episodes, screened as
published: channels chosen by L2 norm, no refit, no re-rank (`AS_PUBLISHED`); `uniform_lstsq` is the rule with the
default's least-squares refit, to tell the refit's share from the search's.

Every run writes `OUT/NETWORK/BUDGET/METHOD/seedS.json` when it finishes (NETWORK: the workdir's folder name;
its compress output resumes under `--work`); rerunning skips finished runs. `python experiments/render_docs.py`
renders the table (mean ± std over seeds, and whether the default beats the uniform rule by more than two
standard deviations) from those files.

    python experiments/search_experiment.py --workdir agmc_jax/baselines/resnet20_fashion_mnist \
        --out experiments/results/search_experiment --work runs/search_experiment \
        --budgets macs=0.5,macs=0.25,params=0.1 --seeds 0,1,2
    python experiments/search_experiment.py --workdir agmc_jax/baselines/lenet5_fashion_mnist \
        --budgets macs=0.25,params=0.1 --methods default,uniform,uniform_lstsq --seeds 0,1,2
    python experiments/search_experiment.py --budgets macs=0.25 --methods default_round1,uniform_round1 \
        --variant 'default_round1={"round_to": 1}' \
        --variant 'uniform_round1={"method": "uniform", "criterion": "l2", "rerank": 0, "round_to": 1}'
"""
import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import agmc_jax

AS_PUBLISHED = {"criterion": "l2", "rerank": 0}  # the other rows' settings, whatever compress's defaults become
METHODS = {"default": {}, "uniform": {"method": "uniform", **AS_PUBLISHED},
           "uniform_lstsq": {"method": "uniform", "criterion": "lstsq"},  # the rule with the default's refit
           **{name: {"method": name, **AS_PUBLISHED} for name in ("amc", "random", "annealing")}}


def parse_budget(text) -> dict:
    """'macs=0.25' -> {'target_macs': 0.25}."""
    resource, value = text.split("=")
    return {f"target_{resource}": float(value)}


def network(args) -> str:
    """The records' and runs' folder of the network: the workdir's name ('resnet20_fashion_mnist')."""
    return Path(args.workdir).resolve().name


def parse_variant(text) -> tuple:
    """'default_round1={"round_to": 1}' -> ('default_round1', {'round_to': 1}): a row of `agmc compress`'s
    defaults with these CompressConfig fields changed."""
    name, _, fields = text.partition("=")
    if not name or name in METHODS or not fields:
        raise argparse.ArgumentTypeError(f"give NAME=JSON with a name other than {', '.join(METHODS)}, got {text!r}")
    try:
        return name, json.loads(fields)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{name}'s fields are not JSON ({error.msg}): {fields!r}") from None


def run(args, budget, method, seed, defaults) -> dict:
    """One compression; returns its record."""
    options = {**parse_budget(budget), "seed": seed, "episodes": args.episodes,
               "reward_images": args.reward_images}
    options.update(defaults if method == "default" else {**METHODS, **dict(args.variant)}[method])
    config = agmc_jax.CompressConfig(**options)
    began = time.perf_counter()
    done = agmc_jax.compress(config, Path(args.work) / network(args) / budget / method / f"seed{seed}",
                             workdir=args.workdir, resume=True)
    report = done.report
    finetune = json.loads((done.network / "summary.json").read_text()) if (done.network / "summary.json").exists() \
        else {}
    rerank = report.get("rerank", [])
    trained = (config.rerank_steps * len(rerank)
               + (config.episodes * (config.reward_steps or 32) if config.reward == "finetuned" else 0))
    accuracy, seconds = report["accuracy"], report.get("seconds", {})
    return {"network": network(args), "budget": budget, "method": method, "seed": seed, "config": dict(vars(config)),
            "test": accuracy["finetuned"]["test"], "validation": accuracy["finetuned"]["validation"],
            "pruned_test": accuracy["pruned"]["test"], "dense_test": accuracy["dense"]["test"],
            "macs_ratio": report["macs"]["ratio"], "params_ratio": report["params"]["ratio"],
            "search_training_steps": trained, "seconds_total": time.perf_counter() - began,
            "seconds_finetune": finetune.get("seconds"), "seconds_search": seconds.get("search"),
            "seconds_rerank": seconds.get("rerank"), "rerank": rerank,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "command": shlex.join(["python", *sys.argv]),
            "date": time.strftime("%Y-%m-%d")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="agmc_jax/baselines/resnet20_fashion_mnist")
    parser.add_argument("--out", default="experiments/results/search_experiment")
    parser.add_argument("--work", default="runs/search_experiment")
    parser.add_argument("--budgets", default="macs=0.5,macs=0.25,params=0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--reward-images", type=int, default=1000)
    parser.add_argument("--default", default="{}", help="JSON of CompressConfig fields for the default row")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=JSON",
                        help="one more row (name it in --methods): compress's defaults with these fields changed")
    args = parser.parse_args()
    out = Path(args.out)
    defaults = json.loads(args.default)
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed by seed: an interrupted run has whole seeds
        for budget in args.budgets.split(","):
            for method in args.methods.split(","):
                path = out / network(args) / budget / method / f"seed{seed}.json"
                if path.exists():
                    continue
                record = run(args, budget, method, seed, defaults)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, indent=1))
                print(f"{network(args)} {budget} {method} seed {seed}: test {100 * record['test']:.2f}% "
                      f"({record['seconds_total'] / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
