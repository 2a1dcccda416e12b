"""Deterministic batches: shuffling and augmentation depend only on (seed, epoch, batch index).

A resumed run therefore sees exactly the batches it would have seen, and every process of a
multi-process run takes its contiguous slice of the same global batch. The batches of a run are a
grain `MapDataset` (element i: this process's part of global batch i), read by `loader.BatchIterator`
in worker processes.
"""
import functools
from typing import NamedTuple

import grain
import jax
import numpy as np

from agmc_jax.data.loader import BatchIterator
from agmc_jax.data.sources import Source, read_records, split_data_source
from agmc_jax.data.specs import DatasetSpec, dataset_spec
from agmc_jax.data.transforms import UNIFORMS, normalize, preprocess
from agmc_jax.errors import InputShapeError


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng((seed, epoch)).permutation(size)


@functools.lru_cache(maxsize=2)
def _cached_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """`epoch_order`, read-only and computed once per process and epoch (ImageNet's takes tens of ms)."""
    order = epoch_order(size, seed, epoch)
    order.setflags(write=False)
    return order


def batch_uniforms(seed: int, epoch: int, step: int, size: int) -> np.ndarray:
    """The augmentation randomness of one global batch, fixed by (seed, epoch, step)."""
    return np.random.default_rng((seed, epoch, step)).random((size, UNIFORMS))


def steps_per_epoch(source: Source, batch_size: int) -> int:
    """The number of full global batches in one pass over `source`."""
    if batch_size < 1:
        raise InputShapeError(f"batch size must be at least 1, got {batch_size}")
    return len(source) // batch_size


def process_slice(size: int, process_index: int, process_count: int) -> slice:
    """The contiguous part of a global batch of `size` that process `process_index` takes (as np.array_split)."""
    base, extra = divmod(size, process_count)
    start = process_index * base + min(process_index, extra)
    return slice(start, start + base + (process_index < extra))


class BatchPlan(NamedTuple):
    """What global batch i of a run is: everything a worker process needs to make it (picklable, NumPy only)."""

    source: Source
    spec: DatasetSpec
    batch_size: int  # global
    train: bool  # shuffle per (seed, epoch) and augment per (seed, epoch, step); else source order, evaluation view
    seed: int
    epoch: int  # the epoch of batch 0
    examples: int  # used per epoch: all, or whole batches only when the remainder is dropped
    process_index: int
    process_count: int


def plan_steps(plan: BatchPlan) -> int:
    """Global batches per epoch (the last one smaller when the remainder is kept)."""
    return -(-plan.examples // plan.batch_size)


def make_batch(plan: BatchPlan, index: int) -> dict:
    """This process's part of the run's global batch `index` (step index % steps of epoch plan.epoch + index //
    steps): {'image': float32 NHWC normalised, 'label': int32}."""
    steps = plan_steps(plan)
    epoch, step = plan.epoch + index // steps, index % steps
    positions = np.arange(step * plan.batch_size, min((step + 1) * plan.batch_size, plan.examples))
    global_indices = _cached_order(len(plan.source), plan.seed, epoch)[positions] if plan.train else positions
    part = process_slice(len(global_indices), plan.process_index, plan.process_count)
    uniforms = batch_uniforms(plan.seed, epoch, step, len(global_indices))[part] if plan.train else None
    images, labels = plan.source.get(global_indices[part])
    images = preprocess(images, plan.spec.augment, plan.spec.input_shape, uniforms)
    return {"image": normalize(images, plan.spec.mean, plan.spec.std), "label": labels}


def batch_dataset(plan: BatchPlan, epochs: int = 1) -> grain.MapDataset:
    """The global batches of `epochs` epochs from `plan.epoch` as a grain dataset of this process's parts."""
    return grain.MapDataset.range(epochs * plan_steps(plan)).map(functools.partial(make_batch, plan))


def batches(source: Source, spec_or_name: DatasetSpec | str, batch_size: int, *, train: bool, seed: int = 0,
            epoch: int = 0, drop_remainder: bool = True, process_index: int | None = None,
            process_count: int | None = None, workers: int = 0, epochs: int = 1) -> BatchIterator:
    """This process's part of each global batch: {'image': float32 NHWC normalised, 'label': int32}.

    `batch_size` is global; each of `process_count` processes gets `batch_size // process_count`.
    train=True shuffles per (seed, epoch) and augments per (seed, epoch, batch); train=False keeps
    the source order and applies the evaluation view only. The batches of `epochs` epochs from `epoch`
    follow one another; `workers` processes make them (0: threads of this process). The iterator's
    `get_state()` / `set_state()` resume it at a batch (see `loader.BatchIterator`).
    """
    spec = spec_or_name if isinstance(spec_or_name, DatasetSpec) else dataset_spec(spec_or_name)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if batch_size < 1 or batch_size % count:
        raise InputShapeError(f"batch size {batch_size} must be a positive multiple of the {count} processes")
    if not 0 <= index < count:
        raise InputShapeError(f"process index {index} is not in [0, {count})")
    examples = steps_per_epoch(source, batch_size) * batch_size if drop_remainder else len(source)
    plan = BatchPlan(source, spec, batch_size, train, seed, epoch, examples, index, count)
    return BatchIterator(batch_dataset(plan, epochs), workers)


def load_arrays(name: str, split: str, data_dir: str | None = None, limit: int | None = None) -> tuple:
    """The first `limit` examples of a split (all if None), preprocessed for evaluation: (float32 NHWC, int32)."""
    spec = dataset_spec(name)
    data_source = split_data_source(name, split, data_dir)
    size = len(data_source) if limit is None else min(limit, len(data_source))
    if size < 1:
        raise InputShapeError(f"limit must be at least 1, got {limit}")
    images, labels = read_records(data_source, range(size), stack=spec.augment != "imagenet")
    return normalize(preprocess(images, spec.augment, spec.input_shape, None), spec.mean, spec.std), labels
