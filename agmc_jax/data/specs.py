"""The datasets we know: classes, input shape, normalisation, augmentation and validation hold-out."""
from typing import NamedTuple

from agmc_jax.errors import UnknownDatasetError


class DatasetSpec(NamedTuple):
    """What a model and a pipeline need to know about one dataset."""

    num_classes: int
    input_shape: tuple  # (H, W, C) after preprocessing
    mean: tuple  # per channel, in [0, 1] pixel units
    std: tuple  # per channel, in [0, 1] pixel units
    augment: str  # 'crop' (pad 4, random crop), 'crop_flip' (and horizontal flip), 'imagenet' or 'none'
    validation_size: int  # examples held out of the end of tfds 'train' as our 'validation'


DATASETS = {
    "fashion_mnist": DatasetSpec(10, (28, 28, 1), (0.2860,), (0.3530,), "crop_flip", 5000),
    "mnist": DatasetSpec(10, (28, 28, 1), (0.1307,), (0.3081,), "crop", 5000),
    "cifar10": DatasetSpec(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip", 5000),
    "imagenet2012": DatasetSpec(1000, (224, 224, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet",
                                10000),
}

SPLITS = ("train", "validation", "test")


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry for `name`, or an `UnknownDatasetError` listing the known names."""
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]
