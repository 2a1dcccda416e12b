"""Input pipelines: dataset specs, random-access sources (tfds or in-memory) and deterministic batches (grain)."""
from agmc_jax.data.loader import BatchIterator, check_workers, default_workers
from agmc_jax.data.mocking import mock_data
from agmc_jax.data.pipeline import BatchPlan, batch_dataset, batches, load_arrays, steps_per_epoch
from agmc_jax.data.sources import ArraySource, Source, check_splits, load, register_dataset
from agmc_jax.data.specs import DATASETS, DatasetSpec, dataset_spec

__all__ = ["DATASETS", "ArraySource", "BatchIterator", "BatchPlan", "check_splits", "check_workers", "DatasetSpec",
           "Source", "batch_dataset", "batches", "dataset_spec", "default_workers", "load", "load_arrays", "mock_data",
           "register_dataset", "steps_per_epoch"]
