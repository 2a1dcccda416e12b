"""The reward, the search and ADMM training spread over 4 CPU devices (a subprocess with 4 host devices) equal
one device's."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os
import jax
import numpy as np
from jax.sharding import Mesh
from agmc_jax.env import EnvConfig, Environment
from agmc_jax.graph import trace
from agmc_jax.kinds import KINDS
from agmc_jax.models import create_model, init_model
from agmc_jax.search import search
from tests.realistic import realistic

assert jax.device_count() == 4
module = create_model("resnet20", 10, widths=(4, 8, 8))
variables = realistic(jax.eval_shape(lambda: init_model(module, (8, 8, 1))))
rng = np.random.default_rng(0)
images = rng.normal(size=(50, 8, 8, 1)).astype(np.float32)
labels = rng.integers(0, 10, 50).astype(np.int32)
net = trace(module, variables, images[:1])
one, four = Mesh(np.array(jax.devices()[:1]), ("data",)), Mesh(np.array(jax.devices()), ("data",))
out = {}
for name, kind, options in [("channels", "channels", {}), ("odd calibration", "channels", {"calibration_images": 18}),
                            ("lstsq", "channels", {"criterion": "lstsq", "calibration_images": 16}),
                            ("no re-estimation", "channels", {"recalibrate_bn": False}),
                            ("weights", "weights", {"target_macs": None, "target_params": 0.5})]:
    config = EnvConfig(eval_batch=12, calibration_images=options.pop("calibration_images", 16), **options)
    envs = [Environment(KINDS[kind](net, config), variables, images, labels, config, mesh) for mesh in (one, four)]
    policies = np.stack([envs[0].policy_counts(rng.uniform(size=envs[0].steps)) for _ in range(3)])
    out[name] = {"one": envs[0].accuracy(policies).tolist(), "four": envs[1].accuracy(policies).tolist(),
                 "shards": len(envs[1].data["images"].addressable_shards)}
histories = [search(module, variables, (images, labels), method="amc", episodes=4, progress=False, eval_batch=12,
                    calibration_images=16, mesh=mesh, ddpg_options={"warmup_episodes": 1, "batch_size": 4}).history
             for mesh in (one, four)]
out["search"] = {"one": [h["reward"] for h in histories[0]], "four": [h["reward"] for h in histories[1]],
                 "keep_equal": [h["keep"] for h in histories[0]] == [h["keep"] for h in histories[1]]}
from agmc_jax.prune.admm import AdmmConfig, FitConfig, Sparsity, Target, admm_train, array_feed, masked_train
sparsity = Sparsity(net)
target = Target(filters=np.maximum(1, np.asarray(net.group_sizes) // 2))
trained = [admm_train(module, variables, array_feed(images[:48], labels[:48], 16), sparsity, target,
                      FitConfig(epochs=2, learning_rate=0.05), AdmmConfig(rho=0.5, interval=2), mesh=mesh)
           for mesh in (one, four)]
retrained = [masked_train(module, v, sparsity.masks(v, target), array_feed(images[:48], labels[:48], 16),
                          FitConfig(epochs=1), mesh=mesh)[0] for (v, _), mesh in zip(trained, (one, four))]
gap = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
                       zip(jax.tree.leaves(a), jax.tree.leaves(b)))
out["admm"] = {"distances": [[h["distance"] for h in history] for _, history in trained],
               "admm_gap": gap(trained[0][0], trained[1][0]), "retrain_gap": gap(*retrained),
               "devices": [len(jax.tree.leaves(v["params"])[0].sharding.device_set) for v in retrained]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["channels", "odd calibration", "lstsq", "no re-estimation", "weights"])
def test_rewards_on_four_devices_equal_one_device(measured, case):
    result = measured[case]
    assert result["shards"] == 4
    assert result["one"] == pytest.approx(result["four"], abs=1e-6)


def test_a_search_on_four_devices_equals_one_on_one_device(measured):
    assert measured["search"]["keep_equal"]
    assert measured["search"]["one"] == pytest.approx(measured["search"]["four"], abs=1e-6)


def test_admm_and_masked_training_on_four_devices_equal_one_device(measured):
    result = measured["admm"]
    assert result["distances"][0] == pytest.approx(result["distances"][1], rel=1e-4, abs=1e-6)
    assert result["distances"][0][-1] < result["distances"][0][0]
    assert result["admm_gap"] < 1e-4 and result["retrain_gap"] < 1e-4
    assert result["devices"] == [1, 4]
