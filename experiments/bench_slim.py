"""Inference latency of dense versus physically slimmed networks at about 50% of the MACs, on this CPU.

Every network is timed as deployed: BatchNorm folded into its convolutions (`fold_batchnorm`), the dense reference
folded the same way, so the ratio is slim-folded over dense-folded. Each policy is what `agmc prune --keep K
[--round-to R]` slims to (`rounded_counts`), with K the largest keep ratio (to 0.001) whose network keeps at most
`--target` of the MACs (multiply-accumulates of conv and dense layers); the default rounding (no --round-to) comes
first, then the roundings of `--round-to`. ideal = 1 / MACs kept. All calls are jit-compiled, warm-up excluded,
interleaved (the order reversed every repeat), and the median of `--repeats` calls is reported (x10 at batch 1);
CPU seconds of the process (all threads) too: on a shared machine wall time depends on the load. The unfolded
dense and default-policy networks are timed alongside, to show what folding itself gives.

Run: `python experiments/bench_slim.py --models resnet20,resnet56 --repeats 7`.
"""
import argparse
import os
import time

import jax
import numpy as np

from agmc_jax.env import rounded_counts
from agmc_jax.graph import trace
from agmc_jax.latency import deployed, interleaved
from agmc_jax.models import MODELS, create_model, init_model
from agmc_jax.prune import masks_from_vectors, slim, top_channels

from results_io import write_result  # experiments/results_io.py: JSON under experiments/results/

DEFAULT_MODELS = "resnet20,resnet56"


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


def keep_for_macs(net, target, round_to):
    """(keep K, counts): the largest K in steps of 0.001 whose `agmc prune --keep K` counts keep <= target MACs."""
    best = None
    for keep in np.arange(1, 1001) / 1000:
        counts = rounded_counts(net.group_sizes, keep, round_to)
        if net.cost(counts)[0] <= target * net.macs * (1 + 1e-9):
            best = (float(keep), counts)
    if best is None:
        raise SystemExit(f"no keep ratio with --round-to {round_to} keeps {target:.0%} of the MACs or less")
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated zoo names (default {DEFAULT_MODELS})")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per network at batch > 1 (median)")
    parser.add_argument("--batches", default="256,1", help="comma-separated batch sizes")
    parser.add_argument("--target", type=float, default=0.5, help="most MACs the slimmed network keeps (fraction)")
    parser.add_argument("--round-to", default="1,8,16", help="roundings compared with the default (comma-separated)")
    parser.add_argument("--large-batch-size", type=int, default=None,
                        help="input H=W for ImageNet models at batches > 1 (default: their standard 224)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    roundings = [None] + [int(r) for r in args.round_to.split(",") if r]
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; repeats {args.repeats} (median), warm-up excluded; "
          "every network BatchNorm-folded, speedup = dense folded / slim folded")
    header = (f"{'model':<13} {'batch':>5} {'rounding':<12} {'keep':>6} {'channels':<14} {'MACs':>6} {'ideal':>6} "
              f"{'dense ms':>9} {'slim ms':>9} {'speedup':>8} {'cpu':>6} {'/ideal':>7}")
    rows, notes, records = [], [], []  # records: what experiments/results/bench_slim/ keeps of this run
    for name in args.models.split(","):
        spec = MODELS[name]
        module = create_model(name)
        variables = random_variables(module, spec.input_shape)
        net = trace(module, variables, spec.input_shape)
        policies = {}
        for round_to in roundings:
            keep, counts = keep_for_macs(net, args.target, round_to)
            masks = masks_from_vectors(net, top_channels(net, variables, counts))
            slim_module, slim_vars = slim(net, variables, masks)
            assert trace(slim_module, slim_vars, spec.input_shape).macs == net.cost(counts)[0]
            policies["default" if round_to is None else f"--round-to {round_to}"] = (
                keep, counts, net.cost(counts)[0] / net.macs, slim_module, slim_vars)
        for batch in batches:
            shape = spec.input_shape
            if batch > 1 and args.large_batch_size and shape[0] > 32:
                shape = (args.large_batch_size, args.large_batch_size, shape[2])
            calls = {"dense": deployed(module, variables, shape),
                     "dense unfolded": deployed(module, variables, shape, folded=False)}
            for label, (_, _, _, slim_module, slim_vars) in policies.items():
                calls[label] = deployed(slim_module, slim_vars, shape)
            calls["default unfolded"] = deployed(*policies["default"][3:], shape, folded=False)
            x = jax.device_put(np.random.default_rng(batch).standard_normal((batch, *shape), np.float32))
            t = interleaved({k: (fn, (v, x)) for k, (fn, v) in calls.items()}, args.repeats * (10 if batch == 1 else 1))
            for label, (keep, counts, fraction, _, _) in policies.items():
                speedup, cpu = t["dense"][0] / t[label][0], t["dense"][1] / t[label][1]
                channels = "/".join(str(c) for c in dict.fromkeys(counts.tolist()))
                rows.append(f"{name:<13} {batch:>5} {label:<12} {keep:>6.3f} {channels[:14]:<14} {fraction:>6.1%} "
                            f"{1 / fraction:>5.2f}x {t['dense'][0] * 1e3:>9.2f} {t[label][0] * 1e3:>9.2f} "
                            f"{speedup:>7.2f}x {cpu:>5.2f}x {speedup * fraction:>7.2f}")
                print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
                records.append({"model": name, "batch": batch, "rounding": label, "keep": keep, "channels": channels,
                                "macs_kept": fraction, "ideal": 1 / fraction, "dense_ms": t["dense"][0] * 1e3,
                                "slim_ms": t[label][0] * 1e3, "speedup": speedup, "cpu_speedup": cpu,
                                "load_average": os.getloadavg()[0]})
            notes.append(f"{name} batch {batch}: folding alone: dense {t['dense unfolded'][0] / t['dense'][0]:.2f}x; "
                         f"default slim unfolded vs dense unfolded "
                         f"{t['dense unfolded'][0] / t['default unfolded'][0]:.2f}x")
            print(notes[-1], flush=True)
    print("\nrounding 'default' = `agmc prune --keep K` (8 for groups of 16 channels or more); channels: the distinct "
          "kept counts in group order; /ideal = speedup / ideal")
    print("\n" + header + "\n" + "\n".join(rows) + "\n" + "\n".join(notes))
    write_result("bench_slim", time.strftime("%Y-%m-%d_%H%M%S"), {"args": vars(args), "rows": records,
                                                                  "notes": notes})


if __name__ == "__main__":
    main()
