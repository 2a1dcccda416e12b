"""Training and evaluation throughput of a zoo CIFAR ResNet on synthetic 32x32x3 batches, optionally against PyTorch.

FLOP/s are reported as 2 x MACs (conv and dense multiply-accumulates, counted by `agmc_jax.graph.trace`)
x images per second; a training step counts as 3 forward passes (forward, and backward for inputs and
weights). Run: `python experiments/bench_train.py --steps 5 --batch 128`.

`--vs-torch` also builds the same network in PyTorch (same widths, option-B projection shortcuts,
BatchNorm, SGD with momentum and coupled weight decay; channels-last, PyTorch's faster CPU layout) and
times both in alternating rounds, so that load from other processes hits both; first calls (compilation,
oneDNN warm-up) are reported apart. PyTorch comes from the optional extra `bench`:
`pip install -e '.[bench]'`.
"""
import argparse
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from agmc_jax.graph import trace
from agmc_jax.models.resnet import ResNetCifar
from agmc_jax.train import (TrainConfig, build_module, create_train_state, data_mesh, global_batch, make_eval_step,
                            make_train_step, optimizer_spec, resolve_config)

from results_io import write_result  # experiments/results_io.py: JSON under experiments/results/

TRAINING_PASSES = 3  # a training step costs about three forward passes


def synthetic_batch(batch_size: int, input_shape, num_classes: int, seed: int = 0) -> dict:
    """Normal images and uniform labels, all marked real for evaluation."""
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((batch_size, *input_shape), np.float32),
            "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
            "mask": np.ones(batch_size, np.float32)}


def timed(run, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) per call of `run()` over `steps` calls; `run` returns something to wait on."""
    began, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / steps, (time.process_time() - cpu) / steps


def first_call(run) -> float:
    """Seconds of one call of `run()`, waited for: the compiling (or warming-up) call."""
    began = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - began


def jax_steps(config: TrainConfig, batch: dict, steps: int):
    """(train, eval) callables of our compiled steps on `batch`, and the network's MACs per image."""
    module, mesh = build_module(config), data_mesh()
    state = jax.device_put(create_train_state(module, config.input_shape, config), NamedSharding(mesh, P()))
    variables = jax.tree.map(lambda a: a.copy(), {"params": state.params, "batch_stats": state.batch_stats})
    macs = trace(module, jax.device_get(variables), config.input_shape).macs
    eval_batch = global_batch(batch, mesh)
    train_batch = global_batch({"image": batch["image"], "label": batch["label"]}, mesh)
    train_fn, eval_fn = make_train_step(mesh, module, optimizer_spec(config, steps)), make_eval_step(mesh, module)
    holder = [state]

    def train_once():
        holder[0], metrics = train_fn(holder[0], train_batch)
        return metrics

    return train_once, lambda: eval_fn(variables, eval_batch), macs


def torch_steps(module: ResNetCifar, config: TrainConfig, batch: dict):
    """(train, eval) callables of a PyTorch twin of the CIFAR ResNet `module`, trained like `agmc_jax.train`."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, kernel, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                             nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, projection):
            super().__init__()
            self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1)
            self.shortcut = conv_bn(cin, cout, 1, stride) if projection else nn.Identity()

        def forward(self, x):
            return torch.relu(self.shortcut(x) + self.b(torch.relu(self.a(x))))

    blocks, widths = (module.depth - 2) // 6, module.widths
    layers, cin = [conv_bn(config.input_shape[-1], widths[0], 3, 1), nn.ReLU()], widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks):
            first = stage > 0 and block == 0
            layers.append(Block(cin, width, 2 if first else 1, first))
            cin = width
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, module.num_classes))
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(batch["label"]).long()

    def train_once():
        net.train()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    def eval_once():
        net.eval()
        with torch.inference_mode():
            return net(images).argmax(-1).eq(labels).sum().item()

    return train_once, eval_once


def report(phase: str, name: str, batch: int, seconds: float, cpu: float, flops_per_image: float, first: float):
    """One line of throughput for `phase` ('train' or 'eval') of `name`."""
    images = batch / seconds
    print(f"{phase:5s} {name:7s} {seconds:.3f} s/step ({cpu:.3f} CPU s)  {images:8.1f} images/s  "
          f"{flops_per_image * images / 1e9:6.2f} GFLOP/s  (first call {first:.1f} s)")
    return images


def main() -> None:
    """Measure and print one line per phase (and framework), then the ratios with --vs-torch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=("resnet20", "resnet32", "resnet56"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase and round, after a first call")
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--vs-torch", action="store_true", help="time a PyTorch twin of the network alongside")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds with --vs-torch")
    args = parser.parse_args()
    config = resolve_config(TrainConfig(args.model, "cifar10", epochs=1, batch_size=args.batch))
    batch = synthetic_batch(args.batch, config.input_shape, config.num_classes)
    jax_train, jax_eval, macs = jax_steps(config, batch, args.steps * args.rounds + 1)
    runs = {"jax": {"train": jax_train, "eval": jax_eval}}
    if args.vs_torch:
        import torch
        torch_train, torch_eval = torch_steps(build_module(config), config, batch)
        runs["torch"] = {"train": torch_train, "eval": torch_eval}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{config.model} {config.input_shape} batch {args.batch} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s); {macs / 1e6:.2f}M MACs per image (FLOPs = 2 x MACs); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    passes = {"eval": 1, "train": TRAINING_PASSES}
    firsts = {(name, phase): first_call(run) for name, phases in runs.items() for phase, run in phases.items()}
    totals = {key: np.zeros(2) for key in firsts}
    rounds = args.rounds if args.vs_torch else 1
    for _ in range(rounds):
        for phase in passes:
            for name in runs:
                totals[name, phase] += timed(runs[name][phase], args.steps)
    images = {key: report(key[1], key[0], args.batch, *(totals[key] / rounds), 2 * macs * passes[key[1]], firsts[key])
              for key in sorted(totals, key=lambda k: (k[1] != "train", k[0]))}
    if args.vs_torch:
        print(f"load average {os.getloadavg()[0]:.1f} at the end: PyTorch's OpenMP threads lose more than XLA's "
              "when other processes hold the cores, so ratios measured under load overstate ours")
        for phase in passes:
            print(f"{phase:5s} ratio jax/torch: {images['jax', phase] / images['torch', phase]:.2f}x images/s")
    write_result("bench_train", time.strftime("%Y-%m-%d_%H%M%S"), {
        "args": vars(args), "load_average_end": os.getloadavg()[0],
        "rows": [{"framework": name, "phase": phase, "images_per_s": value} for (name, phase), value in images.items()]})


if __name__ == "__main__":
    main()
