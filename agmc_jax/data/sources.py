"""Random-access sources of (image, label) examples: in-memory arrays or a tfds split.

Splits: our 'train' is tfds 'train' without its last `validation_size` examples, our
'validation' is those examples, our 'test' is tfds 'test' (for imagenet2012, tfds 'validation').
Data locations: fashion_mnist reads IDX files from `data_dir` (default
/usr/share/datasets/fashion-mnist) and prepares them once into `fashion_mnist.tfds_cache_dir()`;
mnist, cifar10 and imagenet2012 read datasets prepared as array_record in the tfds `data_dir`
(default: tfds's own, `$TFDS_DATA_DIR` or ~/tensorflow_datasets). Preparing them needs network and
TensorFlow once (`tfds build NAME --data_dir=DIR --file_format=array_record`); imagenet2012 also
needs the ILSVRC2012 tars in `DIR/downloads/manual`.
"""
import abc
import os

import numpy as np
import tensorflow_datasets as tfds

from agmc_jax.data import fashion_mnist
from agmc_jax.data.specs import DATASETS, SPLITS, DatasetSpec, dataset_spec
from agmc_jax.errors import DataNotFoundError, InputShapeError

ARRAYS = {}  # dataset name -> {split: ArraySource}: datasets held in memory (`register_dataset`)

TEST_SPLIT = {"imagenet2012": "validation"}  # tfds split serving as our 'test' where it is not 'test'


class Source(abc.ABC):
    """`len(source)` examples; `source.get(indices)` -> (images, int32 labels).

    Images are a uint8 NHWC array, or a list of HWC arrays for datasets whose images differ in
    size (imagenet2012): those are cropped to the input shape by `batches`.
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of examples."""

    @abc.abstractmethod
    def get(self, indices: np.ndarray) -> tuple:
        """(images, labels) of the examples at `indices`, in that order."""


class ArraySource(Source):
    """A source over in-memory uint8 NHWC images and their labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images, labels = np.asarray(images), np.asarray(labels, np.int32)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise InputShapeError(f"images must be uint8 NHWC, got {images.dtype} of shape {images.shape}")
        if labels.shape != images.shape[:1]:
            raise InputShapeError(f"{images.shape[0]} images but labels of shape {labels.shape}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        """The number of examples."""
        return len(self.labels)

    def get(self, indices: np.ndarray) -> tuple:
        """(images, labels) at `indices` by fancy indexing."""
        return self.images[indices], self.labels[indices]


class TfdsSource(Source):
    """A source over a tfds data source; `in_memory` reads the whole split into arrays on first `get`."""

    def __init__(self, data_source, in_memory: bool):
        self.data_source, self.in_memory, self._arrays = data_source, in_memory, None

    def __len__(self) -> int:
        """The number of examples."""
        return len(self.data_source)

    def get(self, indices: np.ndarray) -> tuple:
        """(images, labels) at `indices`: from memory when `in_memory`, else read from the records."""
        if not self.in_memory:
            return read_records(self.data_source, indices, stack=False)
        if self._arrays is None:
            self._arrays = ArraySource(*read_records(self.data_source, range(len(self.data_source)), stack=True))
        return self._arrays.get(indices)


class ArrayRecords:
    """An `ArraySource` as a tfds data source reads: `len` and `__getitems__` of {'image', 'label'} records."""

    def __init__(self, source: ArraySource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices) -> list:
        images, labels = self.source.get(np.asarray(indices, np.int64))
        return [{"image": image, "label": label} for image, label in zip(images, labels)]


def check_splits(name: str, splits) -> None:
    """Raise `DataNotFoundError` unless `splits` has each of our splits."""
    missing = [split for split in SPLITS if split not in splits]
    if missing:
        raise DataNotFoundError(f"dataset {name!r} has no {', '.join(missing)} split; give (images, labels) for "
                                f"each of {', '.join(SPLITS)}")


def register_dataset(name: str, spec: DatasetSpec, splits=None) -> None:
    """Add (or replace) the dataset `name`; `splits` maps 'train', 'validation' and 'test' to (uint8 NHWC images,
    labels) held in memory (None: a tfds dataset of that name, prepared as array_record)."""
    if not isinstance(spec, DatasetSpec):
        raise InputShapeError(f"register_dataset takes a DatasetSpec, got {type(spec).__name__}")
    if splits is not None:
        check_splits(name, splits)
        sources = {split: ArraySource(*splits[split]) for split in SPLITS}
        for split, source in sources.items():
            if source.images.shape[1:] != tuple(spec.input_shape) or not len(source):
                raise InputShapeError(f"the {split} images of {name!r} are {len(source)} of shape "
                                      f"{source.images.shape[1:]}; expected at least one of {tuple(spec.input_shape)}")
        ARRAYS[name] = sources
    else:
        ARRAYS.pop(name, None)
    DATASETS[name] = spec


def read_records(data_source, indices, stack: bool) -> tuple:
    """(images stacked to one array if `stack` else a list, int32 labels) of records at `indices`."""
    records = data_source.__getitems__([int(i) for i in indices])
    images = [np.asarray(r["image"], np.uint8) for r in records]
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    return (np.stack(images) if stack else images), labels


def check_split(split: str) -> str:
    """`split`, after checking that it is one of ours."""
    if split not in SPLITS:
        raise DataNotFoundError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


def tfds_split(name: str, split: str) -> str:
    """The tfds split string for our `split` of dataset `name`."""
    held_out = dataset_spec(name).validation_size
    check_split(split)
    return {"train": f"train[:-{held_out}]", "validation": f"train[-{held_out}:]",
            "test": TEST_SPLIT.get(name, "test")}[split]


def not_prepared_message(name: str, builder) -> str:
    """One line saying how to get a tfds dataset prepared with random access into the builder's data dir."""
    root = os.fspath(builder.data_dir_root)
    build = f"`tfds build {name} --data_dir={root} --file_format=array_record`"
    if builder.is_prepared():
        return (f"{name} in {root} is prepared as {builder.info.file_format.value}, which has no random access: "
                f"rebuild it with {build}")
    manual = f" with the ILSVRC2012 tars in {root}/downloads/manual" if name == "imagenet2012" else ""
    return (f"{name} is not prepared in {root}: run {build}{manual} once on a machine with network and TensorFlow, "
            f"or pass --data-dir to where it is prepared")


def split_data_source(name: str, split: str, data_dir: str | None = None):
    """The tfds random-access data source of our `split` of dataset `name`."""
    if name in ARRAYS:
        return ArrayRecords(ARRAYS[name][check_split(split)])
    wanted = tfds_split(name, split)
    if name == "fashion_mnist":  # its builder holds tfds's output back itself
        return fashion_mnist.prepared_builder(data_dir).as_data_source(split=wanted)
    with fashion_mnist.quiet_tfds():
        builder = tfds.builder(name, data_dir=data_dir)
    try:
        return builder.as_data_source(split=wanted)
    except NotImplementedError as e:
        raise DataNotFoundError(not_prepared_message(name, builder)) from e


def load(name: str, split: str, data_dir: str | None = None) -> Source:
    """Our `split` ('train', 'validation' or 'test') of dataset `name` as a random-access `Source`."""
    in_memory = dataset_spec(name).augment != "imagenet"
    if name in ARRAYS:
        return ARRAYS[name][check_split(split)]
    return TfdsSource(split_data_source(name, split, data_dir), in_memory)
