"""A reward added from outside agmc_jax: MnasNet's soft constraint (Tan et al., CVPR 2019).

A reward scores a policy from the accuracy the environment measured, the policy's first resource (MACs; the size
in bits for bit widths) and `bounds = (lowest, highest)` that resource can take under the budget; it runs inside
the compiled search, so it is written in jax.numpy. `mnas` multiplies the top-1 by (resource / highest)^-0.07:
among policies of equal accuracy the cheaper one wins, by a little.

    agmc --plugin examples.custom_reward search --workdir agmc_jax/baselines/lenet5_fashion_mnist \
        --method random --reward mnas --target-macs 0.5 --episodes 20 --out runs/mnas
    python examples/custom_reward.py
"""

import agmc_jax
from agmc_jax.env import Reward

EXPONENT = -0.07  # MnasNet's w for a soft latency target


def mnas(accuracy, resource, bounds):
    """top-1 x (resource / the most the budget allows) ^ EXPONENT."""
    return accuracy * (resource / bounds[1]) ** EXPONENT


agmc_jax.register_reward("mnas", Reward(mnas, "top-1 x (MACs / budget)^-0.07, MnasNet's soft constraint (example)"))


def main(method: str = "random", episodes: int = 20, reward_images: int = 500):
    from agmc_jax.data import load_arrays
    from agmc_jax.networks import load_network

    module, variables, _ = load_network("agmc_jax/baselines/lenet5_fashion_mnist")
    images, labels = load_arrays("fashion_mnist", "validation", limit=reward_images)
    result = agmc_jax.search(module, variables, (images, labels), method=method, target_macs=0.5,
                             episodes=episodes, reward="mnas", progress=False)
    print(f"reward {result.reward:.4f} = top-1 {result.accuracy:.4f} x ({result.macs} / "
          f"{result.env.bounds[1]:.0f}) ^ {EXPONENT}")
    return result


if __name__ == "__main__":
    main()
