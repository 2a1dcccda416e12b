"""Latency of networks as deployed: BatchNorm folded into their convolutions, jit-compiled, compilation and
warm-up excluded, and timed interleaved (order reversed every round), so that the load of a shared machine
falls on every network alike and their ratio means something."""
import time

import jax
import numpy as np

from agmc_jax.graph import trace
from agmc_jax.prune import fold_batchnorm


def deployed(module, variables, input_shape, folded=True):
    """(jitted inference call, its variables on the device): BatchNorm folded, or as trained."""
    if folded:
        module, variables = fold_batchnorm(trace(module, variables, input_shape), variables)
    return jax.jit(lambda v, x: module.apply(v, x, train=False)), jax.device_put(variables)


def _timed_call(fn, args):
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(calls, repeats, warmup=2):
    """{name: (median wall, median CPU seconds of the process)} of `calls` ({name: (fn, args)}), timed in
    `repeats` rounds of one call each, the order reversed every round, after `warmup` untimed calls each."""
    for fn, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    order = list(calls.items())
    for i in range(repeats):
        for name, (fn, args) in (order if i % 2 == 0 else order[::-1]):
            times[name].append(_timed_call(fn, args))
    return {name: tuple(np.median(np.array(t), axis=0)) for name, t in times.items()}


def latency_ms(networks, input_shape, batch, seconds=1.0, repeats=(5, 50)):
    """{name: median milliseconds of one inference call at `batch`} of `networks` ({name: (module, variables)}),
    deployed and interleaved; as many rounds as fit in about `seconds`, within `repeats` (least, most)."""
    x = jax.device_put(np.zeros((batch, *input_shape), np.float32))
    calls = {}
    for name, (module, variables) in networks.items():
        fn, on_device = deployed(module, variables, input_shape)
        calls[name] = (fn, (on_device, x))
    one_round = sum(wall for wall, _ in interleaved(calls, 1, warmup=1).values())  # compiled, then timed once
    rounds = int(np.clip(seconds / max(one_round, 1e-9), *repeats))
    return {name: 1000 * float(wall) for name, (wall, _) in interleaved(calls, rounds, warmup=0).items()}
