"""Inference latency of dense versus physically slimmed networks at about 50% of the MACs, on this CPU.

For each model a uniform keep ratio is chosen by bisection on the exact cost model `net.cost` so that
the slimmed network keeps 50% +- 1% of the MACs (multiply-accumulates of conv and dense layers).
Both networks are jit-compiled; warm-up calls are excluded; dense and slim calls are interleaved
(alternating which goes first) and the median of `--repeats` calls is reported. CPU seconds of the
process (all threads) are reported too: on a shared machine wall time depends on the load.

Run: `python experiments/bench_slim.py --models resnet20,resnet56,mobilenet_v1 --repeats 7`.
"""
import argparse
import os
import time

import jax
import numpy as np

from agmc_jax.env import Budget, EnvConfig
from agmc_jax.graph import trace
from agmc_jax.kinds import Channels
from agmc_jax.models import MODELS, create_model, init_model
from agmc_jax.prune import masks_from_vectors, slim, top_channels

DEFAULT_MODELS = "resnet20,resnet56,mobilenet_v1"


def random_variables(module, input_shape, seed=0):
    """Variables shaped like `init_model`'s (LeCun-normal kernels, random BatchNorm statistics), made
    with numpy: latency does not depend on the values, and this avoids compiling `init`."""
    abstract = jax.eval_shape(lambda: init_model(module, input_shape))
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, abstract)


def ratio_for_macs(net, target=0.5, tolerance=0.01, steps=40):
    """The uniform keep ratio whose kept MACs are closest to `target` x dense MACs (bisection)."""
    def fraction(r):
        return net.cost(net.keep_counts(r))[0] / net.macs

    lo, hi = 1e-3, 1.0
    best = (abs(fraction(hi) - target), hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        f = fraction(mid)
        best = min(best, (abs(f - target), mid))
        lo, hi = (mid, hi) if f < target else (lo, mid)
    ratio = best[1]
    if abs(fraction(ratio) - target) > tolerance:
        raise SystemExit(f"no uniform ratio gives {target:.0%} +- {tolerance:.0%} of the MACs; "
                         f"closest: ratio {ratio:.4f} -> {fraction(ratio):.2%}")
    return ratio, fraction(ratio)


def timed_call(fn, args):
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(dense, dense_args, slim, slim_args, repeats, warmup=2):
    """Median wall and CPU seconds per call of each, measured interleaved after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(dense(*dense_args))
        jax.block_until_ready(slim(*slim_args))
    times = {"dense": [], "slim": []}
    for i in range(repeats):
        order = (("dense", dense, dense_args), ("slim", slim, slim_args))
        for key, fn, args in (order if i % 2 == 0 else order[::-1]):
            times[key].append(timed_call(fn, args))
    return {k: tuple(np.median(np.array(v), axis=0)) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated zoo names (default {DEFAULT_MODELS})")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per network and batch (median)")
    parser.add_argument("--batches", default="1,256", help="comma-separated batch sizes")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the MACs the slimmed network keeps")
    parser.add_argument("--round-to", type=int, default=1,
                        help="keep channel counts in multiples of this (the largest uniform policy within the target)")
    parser.add_argument("--large-batch-size", type=int, default=None,
                        help="input H=W for ImageNet models at batches > 1 (default: their standard 224)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; repeats {args.repeats} (median), warm-up excluded")
    header = (f"{'model':<13} {'input':<11} {'batch':>5} {'keep':>6} {'MACs':>6} {'dense ms':>10} {'slim ms':>10} "
              f"{'speedup':>8} {'/ideal':>7} {'cpu speedup':>11} {'/ideal':>7}")
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        module = create_model(name)
        variables = random_variables(module, spec.input_shape)
        net = trace(module, variables, spec.input_shape)
        if args.round_to > 1:
            config = EnvConfig(target_macs=args.target, round_to=args.round_to)
            counts = Budget(Channels(net, config), config).uniform_counts()
            ratio, fraction = float(np.mean(counts / np.array(net.group_sizes))), net.cost(counts)[0] / net.macs
        else:
            ratio, fraction = ratio_for_macs(net, args.target)
            counts = net.keep_counts(ratio)
        masks = masks_from_vectors(net, top_channels(net, variables, counts))
        slim_module, slim_vars = slim(net, variables, masks)
        slim_net = trace(slim_module, slim_vars, spec.input_shape)
        assert slim_net.macs == net.cost(counts)[0]
        dense = jax.jit(lambda v, x: module.apply(v, x, train=False))
        slim_apply = jax.jit(slim_module.apply)
        variables, slim_vars = jax.device_put(variables), jax.device_put(slim_vars)
        for batch in batches:
            shape = spec.input_shape
            if batch > 1 and args.large_batch_size and shape[0] > 32:
                shape = (args.large_batch_size, args.large_batch_size, shape[2])
            x = jax.device_put(np.random.default_rng(batch).standard_normal((batch, *shape), np.float32))
            t = measure(dense, (variables, x), slim_apply, (slim_vars, x), args.repeats)
            (dense_wall, dense_cpu), (slim_wall, slim_cpu) = t["dense"], t["slim"]
            speedup, cpu_speedup = dense_wall / slim_wall, dense_cpu / slim_cpu
            rows.append(f"{name:<13} {'x'.join(map(str, shape)):<11} {batch:>5} {ratio:>6.3f} {fraction:>6.1%} "
                        f"{dense_wall * 1e3:>10.2f} {slim_wall * 1e3:>10.2f} {speedup:>7.2f}x {speedup * fraction:>7.2f} "
                        f"{cpu_speedup:>10.2f}x {cpu_speedup * fraction:>7.2f}")
            print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
    print("\n/ideal = speedup / (1 / MACs ratio); target at batch 256: >= 0.8")
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
