"""A search method added from outside agmc_jax: one `Method` and one registration.

A method is a state (what the agent sees), an agent (or a rule that picks one policy without episodes) and a
compression kind (what a step compresses). `taper` is a rule: keep ratios falling linearly with depth (early
layers kept, late layers thinned: AutoCompress's experience that bigger, later layers prune more), walled to the
budget and then raised to it like every policy. `amc-columns` reuses AMC's state and DDPG agent on another kind.

    agmc --plugin examples.custom_method search --workdir agmc_jax/baselines/lenet5_fashion_mnist \
        --method taper --target-macs 0.5 --out runs/taper
    python examples/custom_method.py          # the same through the library
"""
import numpy as np

import agmc_jax
from agmc_jax.agents import AGENTS
from agmc_jax.embed import STATES
from agmc_jax.kinds import KINDS


def taper(env) -> np.ndarray:
    """Actions from 1 at the first step to 0 at the last, through the action wall (so the budget holds)."""
    return env.policy_counts(np.linspace(1.0, 0.0, env.steps))


TAPER = agmc_jax.Method("taper", "keep ratios falling with depth, walled and filled to the budget (example)",
                        KINDS["channels"], rule=taper)
AMC_COLUMNS = agmc_jax.Method("amc-columns", "AMC's rule-based states + DDPG, columns per layer (example)",
                              KINDS["columns"], STATES["amc"], AGENTS["ddpg"])
for _method in (TAPER, AMC_COLUMNS):
    agmc_jax.register_method(_method, replace=True)


def main(episodes: int = 1, reward_images: int = 500):
    from agmc_jax.data import load_arrays
    from agmc_jax.networks import load_network

    module, variables, _ = load_network("agmc_jax/baselines/lenet5_fashion_mnist")
    images, labels = load_arrays("fashion_mnist", "validation", limit=reward_images)
    result = agmc_jax.search(module, variables, (images, labels), method="taper", target_macs=0.5,
                             episodes=episodes, progress=False)
    print(f"taper keeps {np.round(result.keep, 2).tolist()} of each group: {result.macs / result.net.macs:.3f} of "
          f"the MACs, top-1 {result.accuracy:.3f} before fine-tuning")
    return result


if __name__ == "__main__":
    main()
