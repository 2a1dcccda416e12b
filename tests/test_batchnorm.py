"""BatchNorm re-estimation: batch statistics of each BatchNorm's input, and the environment scoring with them."""
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze

from agmc_jax.env import EnvConfig, Environment
from agmc_jax.graph import trace
from agmc_jax.kinds import Channels
from agmc_jax.models import create_model, init_model
from agmc_jax.prune.batchnorm import apply_recalibrated, recalibrate

ROOT = Path(__file__).resolve().parents[1]
RESNET = create_model("resnet20", 10, widths=(4, 8, 8))
RESNET_VARIABLES = init_model(RESNET, (8, 8, 1))
IMAGES = np.random.default_rng(0).normal(size=(48, 8, 8, 1)).astype(np.float32)
LABELS = np.random.default_rng(1).integers(0, 10, 48).astype(np.int32)


class DenseBN(nn.Module):
    """Dense then BatchNorm: the BatchNorm's input is x @ kernel, easy to recompute in NumPy. The mode is
    given at call time here (the zoo's ResNet gives it to the constructor)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.BatchNorm()(nn.Dense(5, use_bias=False)(x), use_running_average=not train)


def test_statistics_are_the_batch_mean_and_variance_of_the_input():
    x = np.random.default_rng(2).normal(size=(32, 3)).astype(np.float32) * 3 + 1
    variables = DenseBN().init(jax.random.key(0), x)
    features = x.astype(np.float64) @ np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    stats = recalibrate(DenseBN(), variables, x)["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], features.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"], features.var(0), rtol=1e-4, atol=1e-5)


def test_recalibrated_inference_equals_training_mode_on_the_same_batch():
    """Every BatchNorm normalised by its own batch statistics, as flax does in training mode."""
    trained = jax.tree.map(lambda v: v * 1.7 + 0.3, RESNET_VARIABLES)
    recalibrated = recalibrate(RESNET, trained, IMAGES, train=False)
    inference = RESNET.apply(recalibrated, IMAGES, train=False)
    training, _ = RESNET.apply(trained, IMAGES, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(inference, training, rtol=1e-4, atol=1e-4)
    assert not np.allclose(inference, RESNET.apply(trained, IMAGES, train=False), atol=1e-3)
    outputs, _ = apply_recalibrated(RESNET, trained, IMAGES, train=False)
    np.testing.assert_allclose(outputs, inference, rtol=1e-4, atol=1e-4)


def test_frozen_variables_keep_their_structure():
    frozen = freeze(RESNET_VARIABLES)
    recalibrated = recalibrate(RESNET, frozen, IMAGES, train=False)
    assert jax.tree.structure(recalibrated) == jax.tree.structure(frozen)


def test_networks_without_batchnorm_are_returned_as_they_are():
    lenet = create_model("lenet5", 10)
    variables = init_model(lenet, (28, 28, 1))
    assert recalibrate(lenet, variables, np.zeros((2, 28, 28, 1), np.float32)) is variables


@pytest.mark.parametrize("recalibrate_bn, calibration_images", [(True, 32), (True, 20), (True, 100), (False, 32)])
def test_the_reward_scores_the_exported_network(recalibrate_bn, calibration_images):
    """Also when the calibration images are not whole evaluation batches, or are all the reward images."""
    net = trace(RESNET, RESNET_VARIABLES, IMAGES[:1])
    config = EnvConfig(target_macs=0.5, eval_batch=16, calibration_images=calibration_images,
                       recalibrate_bn=recalibrate_bn)
    env = Environment(Channels(net, config), RESNET_VARIABLES, jnp.asarray(IMAGES), jnp.asarray(LABELS), config)
    counts = env.uniform_counts()
    variables, _ = env.pruned(counts)
    module, slim = env.export(counts)
    exported = float(np.mean(np.argmax(module.apply(slim, IMAGES, train=False), -1) == LABELS))
    assert env.accuracy(np.array([counts]))[0] == pytest.approx(exported, abs=1e-6)
    kept = jax.tree.leaves(jax.tree.map(np.allclose, variables["batch_stats"], RESNET_VARIABLES["batch_stats"]))
    assert all(kept) != recalibrate_bn


MULTI_DEVICE = """
import jax
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tests.test_batchnorm import IMAGES, RESNET, RESNET_VARIABLES
from agmc_jax.prune.batchnorm import recalibrate
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = jax.device_put(IMAGES, NamedSharding(mesh, PartitionSpec("data")))
assert len(sharded.addressable_shards) == 4
stats = jax.jit(lambda v, x: recalibrate(RESNET, v, x, train=False))(RESNET_VARIABLES, sharded)["batch_stats"]
one = recalibrate(RESNET, RESNET_VARIABLES, IMAGES, train=False)["batch_stats"]
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats, one)
"""


def test_statistics_are_global_when_the_images_are_sharded_over_devices():
    run = subprocess.run([sys.executable, "-c", MULTI_DEVICE], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
