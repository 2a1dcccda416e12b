"""A plugin for multi-process tests: `fmnist_subset`, 512 training, 128 validation and 128 test images of
Fashion-MNIST held in memory (`agmc --plugin tests.fmnist_subset train --dataset fmnist_subset ...`)."""
import numpy as np

from agmc_jax import data

_train, _test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
data.register_dataset("fmnist_subset", data.dataset_spec("fashion_mnist")._replace(validation_size=128), {
    "train": _train.get(np.arange(512)), "validation": _train.get(np.arange(512, 640)),
    "test": _test.get(np.arange(128))})
