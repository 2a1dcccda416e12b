"""Latency measurement: networks timed as deployed (folded, and computing what the trained network computes),
interleaved with the order reversed every round, the report's dense and compressed networks side by side."""
import numpy as np

from agmc_jax import latency_ms
from agmc_jax.graph import trace
from agmc_jax.latency import deployed, interleaved
from agmc_jax.models import create_model, init_model
from agmc_jax.prune import masks_from_vectors, slim, top_channels
from test_fold import random_variables

SHAPE = (8, 8, 3)


def test_calls_are_interleaved_with_the_order_reversed_every_round():
    seen = []

    def call(name):
        return lambda: seen.append(name) or np.zeros(())

    timed = interleaved({name: (call(name), ()) for name in "abc"}, repeats=3, warmup=1)
    assert seen == list("abc") + list("abc") + list("cba") + list("abc")
    assert set(timed) == set("abc") and all(wall >= 0 and cpu >= 0 for wall, cpu in timed.values())


def test_the_deployed_network_computes_what_the_trained_one_does():
    module = create_model("resnet20")
    variables = random_variables(module, SHAPE)
    images = np.random.default_rng(0).normal(size=(4, *SHAPE)).astype(np.float32)
    fn, on_device = deployed(module, variables, SHAPE)
    np.testing.assert_allclose(fn(on_device, images), module.apply(variables, images, train=False), atol=1e-4)


def test_latency_of_a_dense_and_a_slimmed_network_side_by_side():
    module = create_model("lenet5")
    variables = init_model(module, (28, 28, 1))
    net = trace(module, variables, (28, 28, 1))
    counts = np.maximum(1, np.asarray(net.group_sizes) // 2)
    slim_module, slim_variables = slim(net, variables, masks_from_vectors(net, top_channels(net, variables, counts)))
    times = latency_ms({"dense": (module, variables), "slim": (slim_module, slim_variables)}, (28, 28, 1), 4,
                       seconds=0.0)
    assert set(times) == {"dense", "slim"} and all(np.isfinite(t) and t > 0 for t in times.values())
