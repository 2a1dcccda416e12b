"""Random data in place of a tfds dataset, for dry runs of a configuration on a machine without the data."""
import contextlib
from unittest import mock

import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking


def _getitems(record_keys, generator):
    return [generator[key] for key in record_keys]


@contextlib.contextmanager
def mock_data(num_examples: int):
    """`tfds.testing.mock_data(num_examples)` (every split of every tfds dataset random, `num_examples` long), with
    its batched read fixed: tfds 4.9.10 calls `_getitems` without `self`."""
    with mock.patch.object(mocking, "_getitems", _getitems), tfds.testing.mock_data(num_examples=num_examples):
        yield
