"""Realistic random variables for tests: what a trained network's statistics look like, without training."""
import jax
import numpy as np


def realistic(abstract, seed=0):
    """Numpy variables for an abstract tree: LeCun-normal kernels (truncated at 2 std, as Flax),
    biases ~N(0, .1), BatchNorm scale ~N(1, .1), shift ~N(0, .1), mean ~N(0, .1), var ~U(.5, 1.5)."""
    rng = np.random.default_rng(seed)

    def truncated_normal(shape):
        z = rng.standard_normal(shape)
        while np.any(bad := np.abs(z) > 2):
            z[bad] = rng.standard_normal(int(bad.sum()))
        return z / 0.87962566103423978

    def make(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return (truncated_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        if name == "scale":
            return rng.normal(1.0, 0.1, shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)  # bias, BatchNorm shift and mean

    return jax.tree_util.tree_map_with_path(make, abstract)
