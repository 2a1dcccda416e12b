"""How much does the re-rank's score of one policy move with the order of its training batches? (issue #22)

The re-rank scores each candidate by one 128-step masked fine-tune on the first training batches of the shuffled
split and compares top-1 rates on the reward images, keeping the uniform rule unless a candidate leads by one
standard error of two rates on those images. The same fine-tune on other batch orders (data seeds; the re-rank
uses the network's own, 0 for the shipped networks) gives the training noise that margin leaves out. Policies:
the uniform rule at the budget and the searched policies of `--policies` (search-settings records, by `keep`).

Resumable: one record per budget under `results/rerank_noise/`, rewritten after each score.

    python experiments/rerank_noise.py --budgets macs=0.25 --orders 0,1,2 \
        --policies experiments/results/search_settings/resnet20_fashion_mnist/macs=0.25/episodes100/seed0.json
"""
import argparse
import json
from pathlib import Path

import numpy as np

import agmc_jax
from agmc_jax.search.rerank import candidates
from results_io import RESULTS, write_result
from search_settings import rerank_environment


def judge(workdir, budget, order):
    """The re-rank's environment at `budget` with its training batches in data order `order`."""
    resource, value = budget.split("=")
    return rerank_environment(workdir, agmc_jax.CompressConfig(**{f"target_{resource}": float(value)}), order)


def rows(scores) -> list:
    """One row per policy (its top-1 per data order, mean and population std) and per searched policy its lead
    over the rule (points) per order."""
    rule = scores.get("uniform rule", {})
    leads = {f"{k} − rule (points)": {o: 100 * (v[o] - rule[o]) for o in v if o in rule}
             for k, v in scores.items() if k != "uniform rule"}
    return [{"policy": k, **{f"order {o}": x for o, x in sorted(v.items())}, "mean": float(np.mean(list(v.values()))),
             "std": float(np.std(list(v.values()))), "n": len(v)} for k, v in {**scores, **leads}.items() if v]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="agmc_jax/baselines/resnet20_fashion_mnist")
    parser.add_argument("--budgets", default="macs=0.25")
    parser.add_argument("--orders", default="0,1,2", help="data seeds of the training batches")
    parser.add_argument("--policies", default="", help="comma-separated search-settings records")
    args = parser.parse_args()
    network = Path(args.workdir).resolve().name
    for budget in args.budgets.split(","):
        name = f"{network}/{budget}"
        path = RESULTS / "rerank_noise" / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {"network": network, "budget": budget,
                                                                     "scores": {}}
        for order in [int(o) for o in args.orders.split(",")]:
            env = None
            for policy in ["uniform rule", *[p for p in args.policies.split(",") if p]]:
                key = f"{Path(policy).parent.name}/{Path(policy).stem}" if policy.endswith(".json") else policy
                if str(order) in record["scores"].get(key, {}):
                    continue
                env = env or judge(args.workdir, budget, order)
                counts = (np.asarray(candidates(env, np.zeros((0, env.steps), np.int32), [], 0)[0][1])
                          if policy == "uniform rule" else
                          np.rint(np.asarray(json.loads(Path(policy).read_text())["keep"]) * env.sizes))
                score = float(env.accuracy(counts[None].astype(np.int32))[0])
                record["scores"].setdefault(key, {})[str(order)] = score
                record["rows"] = rows(record["scores"])
                write_result("rerank_noise", name, record)
                print(f"{name} {key} order {order}: {score:.4f}", flush=True)


if __name__ == "__main__":
    main()
