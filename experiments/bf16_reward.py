"""Issue #24: does the search's reward rank policies the same when its evaluation runs in bfloat16?

On the shipped ResNet-20 (Fashion-MNIST), `--policies` policies at each budget (the uniform rule and random
walled ones, raised to the budget as the search does) are scored by the default reward (top-1 on the reward
images after BatchNorm re-estimation) twice: `reward_dtype="float32"` and `"bfloat16"`. Reported: Kendall tau
and Spearman rho between the two rankings (95% bootstrap intervals), the largest score change, how often the best policy changes, and the
seconds per policy of each (on this CPU bfloat16 is emulated and slower: it is meant for accelerators).

    python experiments/bf16_reward.py --budgets macs=0.5,macs=0.25,params=0.1 --policies 50
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from agmc_jax.data import load_arrays
from agmc_jax.search import SearchConfig, environment, get_method
from agmc_jax.env import EnvConfig
from agmc_jax.train import load_trained

from proxy_study import rank_correlations
from results_io import write_result  # experiments/results_io.py: JSON under experiments/results/


def parse_budget(text) -> dict:
    """'macs=0.25' -> {'target_macs': 0.25}."""
    resource, value = text.split("=")
    return {f"target_{resource}": float(value)}


def scored(env, counts):
    """(accuracies, seconds per policy after compilation) of a batch of policies."""
    env.accuracy(counts[:1])
    start = time.perf_counter()
    accuracies = np.concatenate([env.accuracy(counts[i:i + 1]) for i in range(len(counts))])
    return accuracies, (time.perf_counter() - start) / len(counts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="agmc_jax/baselines/resnet20_fashion_mnist")
    parser.add_argument("--budgets", default="macs=0.5,macs=0.25,params=0.1")
    parser.add_argument("--policies", type=int, default=50)
    parser.add_argument("--reward-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    module, variables, config = load_trained(args.workdir)
    data = load_arrays(config["dataset"], "validation", limit=args.reward_images)
    method = get_method("random")
    rows = []
    for budget in args.budgets.split(","):
        envs = {dtype: environment(method, module, variables, data, SearchConfig(
            env=EnvConfig(**{"target_macs": None, **parse_budget(budget)}, reward_dtype=dtype)))
            for dtype in ("float32", "bfloat16")}
        env = envs["float32"]
        rng = np.random.default_rng(args.seed)
        filled = jax.jit(env.filled)
        counts = np.stack([np.asarray(env.uniform_counts())] + [
            np.asarray(filled(jnp.asarray(env.policy_counts(rng.uniform(size=env.steps)), jnp.int32)))
            for _ in range(args.policies - 1)])
        full, full_s = scored(envs["float32"], counts)
        half, half_s = scored(envs["bfloat16"], counts)
        correlations = rank_correlations(full, half)
        (tau, *tau_ci), (rho, *rho_ci) = correlations["kendall"], correlations["spearman"]
        row = {"budget": budget, "policies": len(counts), "kendall_tau": tau, "kendall_tau_95": tau_ci,
               "spearman_rho": rho, "spearman_rho_95": rho_ci,
               "max_abs_change": float(np.abs(full - half).max()), "mean_abs_change": float(np.abs(full - half).mean()),
               "same_best": bool(np.argmax(full) == np.argmax(half)), "float32_s_per_policy": full_s,
               "bfloat16_s_per_policy": half_s, "float32": full.tolist(), "bfloat16": half.tolist()}
        rows.append(row)
        print(f"{budget}: {len(counts)} policies, Kendall tau {tau:.3f} [{tau_ci[0]:.3f}, {tau_ci[1]:.3f}], Spearman "
              f"rho {rho:.3f}, largest change "
              f"{100 * row['max_abs_change']:.2f} points, same best: {row['same_best']}; s/policy float32 "
              f"{full_s:.3f}, bfloat16 {half_s:.3f}", flush=True)
    write_result("bf16_reward", time.strftime("%Y-%m-%d_%H%M%S"), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
