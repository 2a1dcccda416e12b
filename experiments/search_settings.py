"""Do more episodes or another exploration find better policies? (issue #22, Deliver 5: episodes and exploration)

For each budget, setting and seed, the default search of `agmc compress` (AGMC, the least-squares refit, filled
to the budget) runs on the shipped network with the setting's `CompressConfig` fields changed; its best policy
and the uniform rule's are scored as the re-rank scores them, by the default 128 masked SGD steps (the rule's
once per budget: it depends on neither the seed nor the setting). Recorded: the best screening reward found (and
after how many episodes), both 128-step top-1 rates on the reward images (the re-rank's score, the study's
best-ranking cheap proxy), the lead of one over the other and what the re-rank would export, and the search's
wall time. No final fine-tune: the question is whether a setting finds candidates the re-rank scores above the
rule.

Resumable: each run writes `OUT/BUDGET/SETTING/seedS.json` when done and is skipped when that file exists; the
search checkpoints under `--work`. `python experiments/render_docs.py` renders the table.

    python experiments/search_settings.py --budgets macs=0.25 --seeds 0,1,2 \
        --settings episodes50,episodes100,episodes200,sigma0.25
"""
import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

import agmc_jax
from agmc_jax import data
from agmc_jax.networks import load_network
from agmc_jax.pipeline import run_search, search_config, search_options, training_images
from agmc_jax.search import environment, get_method
from agmc_jax.search.rerank import candidates, rerank, rule_first
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


def rerank_environment(workdir, config, order=None):
    """The re-rank's environment for `config`'s budget (its 128 masked SGD steps per policy), its training batches
    in data order `order` (default: the network's own data seed, as the re-rank reads them)."""
    searching = search_config(**{k: v for k, v in search_options(dataclasses.replace(config, rerank=1)).items()
                                 if k != "data_dir"})
    module, variables, train_config = load_network(workdir)
    reward_data = data.load_arrays(train_config["dataset"], "validation", train_config["data_dir"],
                                   limit=config.reward_images)
    seed = train_config["seed"] if order is None else order
    return environment(get_method(searching.method), module, variables, reward_data, searching._replace(
        env=searching.env._replace(reward="finetuned", reward_steps=searching.rerank_steps)),
        train_data=training_images(searching, {**train_config, "seed": seed}))


def judge(args, config):
    """The re-rank's environment for `config`'s budget and the rule's score there: the rule's policy and the
    training batches do not depend on the search's seed or settings, so one score serves every run of the budget."""
    env = rerank_environment(args.workdir, config)
    return env, rerank(env, candidates(env, np.zeros((0, env.steps), np.int32), [], 0))[0]


def run(args, budget, setting, seed, judges) -> dict:
    """One search and the re-rank's score of its best policy against the rule's; returns its record."""
    config = agmc_jax.CompressConfig(**{**parse_budget(budget), "seed": seed, "rerank": 0, **SETTINGS[setting]})
    began = time.perf_counter()
    result = run_search(args.workdir, Path(args.work) / budget / setting / f"seed{seed}",
                        **search_options(config, resume=True))
    searched = time.perf_counter() - began
    if budget not in judges:
        judges[budget] = judge(args, config)
    env, rule = judges[budget]
    rewards = np.array([episode["reward"] for episode in result.history])
    same = np.array_equal(result.counts, rule.counts)
    found = rule if same else rerank(env, [("search #1", result.counts, result.reward)])[0]
    exported = rule_first(env.count, sorted([found, rule], key=lambda c: -c.score))[0]
    return {"budget": budget, "setting": setting, "seed": seed, "fields": SETTINGS[setting],
            "episodes": config.episodes, "best_reward": float(rewards.max()),
            "best_episode": int(rewards.argmax()),
            "best_reward_by_episode": {str(m): float(rewards[:m].max()) for m in MILESTONES if m <= len(rewards)},
            "search_top1": found.score, "rule_top1": rule.score, "lead": found.score - rule.score,
            "same_as_rule": bool(same), "exported": exported.name,
            "keep": (result.counts / env.sizes).round(4).tolist(), **env.ratios(result.counts),
            "seconds_search": searched, "seconds_rerank": time.perf_counter() - began - searched}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="agmc_jax/baselines/resnet20_fashion_mnist")
    parser.add_argument("--work", default="runs/search_settings")
    parser.add_argument("--budgets", default="macs=0.25")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    network, judges = Path(args.workdir).resolve().name, {}
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed by seed: an interrupted run has whole seeds
        for budget in args.budgets.split(","):
            for setting in args.settings.split(","):
                name = f"{network}/{budget}/{setting}/seed{seed}"
                if (Path(__file__).parent / "results" / "search_settings" / f"{name}.json").exists():
                    continue
                record = run(args, budget, setting, seed, judges)
                write_result("search_settings", name, {"network": network, **record})
                print(f"{name}: best reward {record['best_reward']:.4f}, 128-step top-1 {record['search_top1']:.4f} "
                      f"against the rule's {record['rule_top1']:.4f}", flush=True)


if __name__ == "__main__":
    main()
