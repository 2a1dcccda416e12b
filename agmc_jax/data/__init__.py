"""Input pipelines: dataset specs, random-access sources (tfds or in-memory) and deterministic batches."""
from agmc_jax.data.mocking import mock_data
from agmc_jax.data.pipeline import batches, load_arrays, steps_per_epoch
from agmc_jax.data.sources import ArraySource, Source, check_splits, load, register_dataset
from agmc_jax.data.specs import DATASETS, DatasetSpec, dataset_spec

__all__ = ["DATASETS", "ArraySource", "check_splits", "DatasetSpec", "Source", "batches", "dataset_spec", "load", "load_arrays",
           "mock_data", "register_dataset", "steps_per_epoch"]
