"""Deterministic batches: shuffling and augmentation depend only on (seed, epoch, batch index).

A resumed run therefore sees exactly the batches it would have seen, and every process of a
multi-process run takes its contiguous slice of the same global batch.
"""
from typing import Iterator

import jax
import numpy as np

from agmc_jax.data.sources import Source, read_records, split_data_source
from agmc_jax.data.specs import DatasetSpec, dataset_spec
from agmc_jax.data.transforms import UNIFORMS, normalize, preprocess
from agmc_jax.errors import InputShapeError


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng((seed, epoch)).permutation(size)


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


def batches(source: Source, spec_or_name: DatasetSpec | str, batch_size: int, *, train: bool, seed: int = 0,
            epoch: int = 0, drop_remainder: bool = True, process_index: int | None = None,
            process_count: int | None = None) -> Iterator[dict]:
    """This process's part of each global batch: {'image': float32 NHWC normalised, 'label': int32}.

    `batch_size` is global; each of `process_count` processes gets `batch_size // process_count`.
    train=True shuffles per (seed, epoch) and augments per (seed, epoch, batch); train=False keeps
    the source order and applies the evaluation view only.
    """
    spec = spec_or_name if isinstance(spec_or_name, DatasetSpec) else dataset_spec(spec_or_name)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if batch_size < 1 or batch_size % count:
        raise InputShapeError(f"batch size {batch_size} must be a positive multiple of the {count} processes")
    if not 0 <= index < count:
        raise InputShapeError(f"process index {index} is not in [0, {count})")
    order = epoch_order(len(source), seed, epoch) if train else np.arange(len(source))
    stop = steps_per_epoch(source, batch_size) * batch_size if drop_remainder else len(source)
    return _batches(source, spec, order[:stop], batch_size, train, seed, epoch, index, count)


def _batches(source, spec, order, batch_size, train, seed, epoch, index, count) -> Iterator[dict]:
    """The generator behind `batches`, once its arguments are checked."""
    for step, start in enumerate(range(0, len(order), batch_size)):
        global_indices = order[start:start + batch_size]
        part = process_slice(len(global_indices), index, count)
        uniforms = batch_uniforms(seed, epoch, step, len(global_indices))[part] if train else None
        images, labels = source.get(global_indices[part])
        images = preprocess(images, spec.augment, spec.input_shape, uniforms)
        yield {"image": normalize(images, spec.mean, spec.std), "label": labels}


def load_arrays(name: str, split: str, data_dir: str | None = None, limit: int | None = None) -> tuple:
    """The first `limit` examples of a split (all if None), preprocessed for evaluation: (float32 NHWC, int32)."""
    spec = dataset_spec(name)
    data_source = split_data_source(name, split, data_dir)
    size = len(data_source) if limit is None else min(limit, len(data_source))
    if size < 1:
        raise InputShapeError(f"limit must be at least 1, got {limit}")
    images, labels = read_records(data_source, range(size), stack=spec.augment != "imagenet")
    return normalize(preprocess(images, spec.augment, spec.input_shape, None), spec.mean, spec.std), labels
