"""N:M structured sparsity, a kind added from outside the package (`examples/nm_sparsity.py`): its masks against
brute force, and the kind through `agmc_jax.search`, `agmc compress` and `agmc export` with the pattern checked on
the exported weights."""
import itertools
import json

import jax
import numpy as np
import pytest

import agmc_jax
from agmc_jax import data
from agmc_jax.kinds import KINDS
from agmc_jax.networks import load_network
from agmc_jax.portable import load_exported
from examples import nm_sparsity
from examples.nm_sparsity import PATTERNS, pattern_mask
from tests.test_cli import BASELINE, run


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_pattern_mask_keeps_the_largest_n_of_every_m(n, m):
    kernel = np.random.default_rng(n * m).normal(size=(3, 2, 16, 5))
    mask = pattern_mask(kernel, n, m)
    for i, j, group, out in itertools.product(range(3), range(2), range(16 // m), range(5)):
        weights = np.abs(kernel[i, j, group * m:(group + 1) * m, out])
        kept = sorted(np.argsort(-weights, kind="stable")[:n])
        assert list(np.flatnonzero(mask[i, j, group * m:(group + 1) * m, out])) == kept


def _check_patterns(variables, policy):
    """Every searched layer's kernel has at most N non-zeros in each group of M inputs of its chosen pattern;
    returns the non-zero weights of those kernels."""
    kernels = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
               for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    nonzero = 0
    for layer in policy:
        kernel = kernels[f"{layer['name']}/kernel"]
        n, m = (1, 1) if layer["pattern"] == "dense" else map(int, layer["pattern"].split(":"))
        groups = kernel.reshape(*kernel.shape[:-2], kernel.shape[-2] // m, m, kernel.shape[-1])
        assert (np.count_nonzero(groups, axis=-2) <= n).all(), layer
        nonzero += np.count_nonzero(kernel)
    return nonzero


def test_search_meets_the_parameter_budget_with_patterns_on_the_exported_weights():
    """A random search over dense / 4:8 / 2:4 per layer of ResNet-20: the budget is met, each exported kernel has
    its pattern, and the search's parameter count is the exported network's non-zero weights counted apart."""
    module, variables, config = load_network(BASELINE.parent / "resnet20_fashion_mnist")
    images, labels = data.load_arrays("fashion_mnist", "validation", limit=200)
    result = agmc_jax.search(module, variables, (images, labels), method="random", kind="nm", target_params=0.6,
                             episodes=6, seed=0)
    policy = result.policy()
    assert policy["params_ratio"] <= 0.6 + 1e-6 and policy["unit"] == "patterns"
    assert {layer["pattern"] for layer in policy["layers"]} <= {"dense", "4:8", "2:4"}
    _, exported = result.slim()
    nonzero = _check_patterns(exported, policy["layers"])
    searched = sum(int(np.prod(np.shape(k))) for k in jax.tree.leaves(variables["params"]) if np.ndim(k) in (2, 4)
                   and np.shape(k)[-2] % 8 == 0)
    assert result.params == result.net.params - searched + nonzero
    assert KINDS["nm"] is nm_sparsity.NM and PATTERNS[-1] == (1, 1)


@pytest.mark.slow  # minutes of end-to-end fine-tuning: run with -m slow
def test_compress_and_export_with_the_plugin_from_the_command_line(capsys, tmp_path):
    """`agmc --plugin examples.nm_sparsity compress --kind nm` on LeNet-5, then `agmc export`: the fine-tuned
    network keeps its patterns (sparse fine-tune) and the portable artifact computes its logits."""
    out = tmp_path / "c"
    status, _, err = run(capsys, "--plugin", "examples.nm_sparsity", "compress", "--workdir", str(BASELINE),
                         "--out", str(out), "--kind", "nm", "--method", "random", "--target-params", "0.7",
                         "--episodes", "4", "--reward-images", "64", "--no-rerank")
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["ratio"] <= 0.7 + 1e-6
    module, variables, _ = load_network(out / "search" / "finetune")
    _check_patterns(variables, report["layers"])
    status, _, err = run(capsys, "export", str(out), "--out", str(tmp_path / "e"))
    assert status == 0, err
    images = data.load_arrays("fashion_mnist", "test", limit=8)[0]
    np.testing.assert_allclose(load_exported(tmp_path / "e")(images), module.apply(variables, images, train=False),
                               rtol=1e-5, atol=1e-5)


def test_an_unknown_plugin_is_one_line(capsys):
    status, _, err = run(capsys, "--plugin", "no_such_module_here", "search", "--help")
    assert status == 2 and "--plugin no_such_module_here cannot be imported" in err and len(err.splitlines()) == 1
