"""Training and evaluation throughput of ResNet-20 on synthetic 32x32x3 batches, data parallel over all devices.

FLOP/s are reported as 2 x MACs (conv and dense multiply-accumulates, counted by `agmc_jax.graph.trace`)
x images per second; a training step counts as 3 forward passes (forward, and backward for inputs and
weights). Run: `python experiments/bench_train.py --steps 5 --batch 128`.
"""
import argparse
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from agmc_jax.graph import trace
from agmc_jax.train import (TrainConfig, build_module, create_train_state, data_mesh, global_batch, make_eval_step,
                            make_train_step, optimizer_spec, resolve_config)

TRAINING_PASSES = 3  # a training step costs about three forward passes


def synthetic_batch(batch_size: int, input_shape, num_classes: int, seed: int = 0) -> dict:
    """Normal images and uniform labels, all marked real for evaluation."""
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((batch_size, *input_shape), np.float32),
            "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
            "mask": np.ones(batch_size, np.float32)}


def timed(run, steps: int) -> tuple[float, float, float]:
    """Seconds of the first (compiling) call of `run()`, then wall and CPU seconds per call over `steps` calls.

    CPU seconds (all threads) help on a shared machine, where wall time depends on the load.
    """
    began = time.perf_counter()
    jax.block_until_ready(run())
    compiled, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return compiled - began, (time.perf_counter() - compiled) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    """Measure and print one line per phase."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase, after one warm-up step")
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    args = parser.parse_args()
    config = resolve_config(TrainConfig("resnet20", "cifar10", epochs=1, batch_size=args.batch))
    module, mesh = build_module(config), data_mesh()
    state = jax.device_put(create_train_state(module, config.input_shape, config), NamedSharding(mesh, P()))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    macs = trace(module, jax.device_get(variables), config.input_shape).macs
    batch = synthetic_batch(args.batch, config.input_shape, config.num_classes)
    eval_batch = global_batch(batch, mesh)
    train_batch = global_batch({"image": batch["image"], "label": batch["label"]}, mesh)
    train_fn, eval_fn = make_train_step(mesh, module, optimizer_spec(config, args.steps + 1)), make_eval_step(mesh, module)
    holder = [state]

    def train_once():
        holder[0], metrics = train_fn(holder[0], train_batch)
        return metrics

    print(f"{config.model} {config.input_shape} batch {args.batch} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s); {macs / 1e6:.2f}M MACs per image (FLOPs = 2 x MACs)")
    # Evaluation first: training donates (deletes) the state's buffers that `variables` shares.
    for phase, run, passes in (("eval", lambda: eval_fn(variables, eval_batch), 1),
                               ("train", train_once, TRAINING_PASSES)):
        compile_seconds, seconds, cpu_seconds = timed(run, args.steps)
        images = args.batch / seconds
        print(f"{phase:5s}  {seconds:.3f} s/step ({cpu_seconds:.3f} CPU s)  {images:8.1f} images/s  "
              f"{2 * macs * passes * images / 1e9:6.2f} GFLOP/s  (first call {compile_seconds:.1f} s)")


if __name__ == "__main__":
    main()
