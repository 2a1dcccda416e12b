"""Do more episodes or another exploration find better policies? (issue #22, Deliver 5: episodes and exploration)

For each budget, setting and seed, the default search of `agmc compress` (AGMC, the least-squares refit, filled
to the budget) runs on the shipped network with the setting's `CompressConfig` fields changed, then re-ranks its
best policy and the uniform rule's by the default 128 masked SGD steps (`rerank=1`: what the re-rank would see
first). Recorded: the best screening reward found (and after how many episodes), the best policy's and the rule's
128-step top-1 on the reward images (the re-rank's score, the study's best-ranking cheap proxy), the lead of one
over the other and what the re-rank would export, and the search's wall time. No final fine-tune: the question
is whether a setting finds candidates the re-rank scores above the rule.

Resumable: each run writes `OUT/BUDGET/SETTING/seedS.json` when done and is skipped when that file exists; the
search checkpoints under `--work`. `python experiments/render_docs.py` renders the table.

    python experiments/search_settings.py --budgets macs=0.25 --seeds 0,1,2
"""
import argparse
import time
from pathlib import Path

import numpy as np

import agmc_jax
from agmc_jax.pipeline import run_search, search_options
from results_io import write_result

SETTINGS = {  # name -> CompressConfig fields changed from compress's defaults
    "episodes50": {"episodes": 50},
    "episodes100": {},
    "episodes200": {"episodes": 200},
    "sigma0.25": {"agent_option": {"sigma": 0.25}},
    "sigma1": {"agent_option": {"sigma": 1.0}},
}
MILESTONES = (10, 25, 50, 100, 200)  # episodes at which the best screening reward so far is recorded


def parse_budget(text) -> dict:
    """'macs=0.25' -> {'target_macs': 0.25}."""
    resource, value = text.split("=")
    return {f"target_{resource}": float(value)}


def run(args, budget, setting, seed) -> dict:
    """One search and its one-candidate re-rank; returns its record."""
    config = agmc_jax.CompressConfig(**{**parse_budget(budget), "seed": seed, "rerank": 1, **SETTINGS[setting]})
    began = time.perf_counter()
    result = run_search(args.workdir, Path(args.work) / budget / setting / f"seed{seed}",
                        **search_options(config, resume=True))
    rewards = np.array([episode["reward"] for episode in result.history])
    found = next(c for c in result.candidates if c.name.startswith("search #1"))
    rule = next(c for c in result.candidates if c.name.endswith("uniform rule"))
    env = result.env
    return {"budget": budget, "setting": setting, "seed": seed, "fields": SETTINGS[setting],
            "episodes": config.episodes, "best_reward": float(rewards.max()),
            "best_episode": int(rewards.argmax()),
            "best_reward_by_episode": {str(m): float(rewards[:m].max()) for m in MILESTONES if m <= len(rewards)},
            "search_top1": found.score, "rule_top1": rule.score, "lead": found.score - rule.score,
            "same_as_rule": found is rule, "exported": result.candidates[0].name,
            "keep": (found.counts / env.sizes).round(4).tolist(), **env.ratios(found.counts),
            "seconds_search": time.perf_counter() - began - result.rerank_seconds,
            "seconds_rerank": result.rerank_seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="agmc_jax/baselines/resnet20_fashion_mnist")
    parser.add_argument("--work", default="runs/search_settings")
    parser.add_argument("--budgets", default="macs=0.25")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    network = Path(args.workdir).resolve().name
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed by seed: an interrupted run has whole seeds
        for budget in args.budgets.split(","):
            for setting in args.settings.split(","):
                name = f"{network}/{budget}/{setting}/seed{seed}"
                if (Path(__file__).parent / "results" / "search_settings" / f"{name}.json").exists():
                    continue
                record = run(args, budget, setting, seed)
                write_result("search_settings", name, {"network": network, **record})
                print(f"{name}: best reward {record['best_reward']:.4f}, 128-step top-1 {record['search_top1']:.4f} "
                      f"against the rule's {record['rule_top1']:.4f}", flush=True)


if __name__ == "__main__":
    main()
