"""Fashion-MNIST from its four IDX files, prepared once into a local tfds cache without TensorFlow.

The IDX files come from the Debian package `dataset-fashion-mnist` (or any directory holding
them, gzipped or not). Preparing writes array_record files, which `as_data_source` reads with
random access; tfds writes into an `incomplete.*` directory and renames it when done, and a file
lock keeps two processes from preparing at once.
"""
import contextlib
import fcntl
import gzip
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import zlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from agmc_jax.errors import DataError, DataNotFoundError

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")


def tfds_cache_dir() -> str:
    """Where our own builders' prepared files live: `$AGMC_TFDS_DIR` or `~/.cache/agmc_jax/tensorflow_datasets`."""
    return os.environ.get("AGMC_TFDS_DIR") or os.path.expanduser("~/.cache/agmc_jax/tensorflow_datasets")


def idx_path(idx_dir: str, stem: str) -> str | None:
    """The gzipped or plain file `stem` in `idx_dir`, or None if neither exists."""
    for path in (os.path.join(idx_dir, stem + ".gz"), os.path.join(idx_dir, stem)):
        if os.path.isfile(path):
            return path
    return None


def check_idx_dir(idx_dir: str) -> None:
    """Raise a `DataNotFoundError` that says how to get the files if any IDX file is missing."""
    missing = [stem for stems in IDX_FILES.values() for stem in stems if idx_path(idx_dir, stem) is None]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST IDX files not found in {idx_dir} (missing {', '.join(missing)}[.gz]): install them with "
            f"`apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding them")


def read_idx(path: str) -> np.ndarray:
    """The uint8 array stored in an IDX file: two zero bytes, type 0x08, rank, big-endian dims, data; a damaged
    file (cut short, bad gzip data, a header that disagrees) is a one-line `DataError` naming it."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path} is damaged ({error}); download or reinstall it (`apt-get install --reinstall "
                        "dataset-fashion-mnist`)") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * data[3]:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; give --data-dir the Fashion-MNIST IDX files")
    rank = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if values.size != np.prod(dims):
        raise DataError(f"{path} holds {values.size} bytes but its header says {dims}: it is cut short or damaged; "
                        "download or reinstall it")
    return values.reshape(dims)


def check_idx_files(idx_dir: str) -> None:
    """Read the four IDX files of `idx_dir` and raise a one-line `DataError` naming the first that is damaged or
    does not fit its pair (images N x 28 x 28, labels N in 0..9): checked before a cache is prepared from them."""
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images, labels = read_idx(idx_path(idx_dir, images_stem)), read_idx(idx_path(idx_dir, labels_stem))
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{idx_path(idx_dir, images_stem)} holds images of shape {images.shape[1:]}, not 28x28")
        if labels.shape != images.shape[:1] or labels.max(initial=0) >= len(CLASS_NAMES):
            raise DataError(f"{idx_path(idx_dir, labels_stem)} does not hold one label in 0..9 for each of the "
                            f"{len(images)} {split} images")


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST read from local IDX files (the manual dir); examples keep the IDX order."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The four Fashion-MNIST IDX files (`apt-get install dataset-fashion-mnist`)."
    # tfds derives this through `importlib_resources`, which it does not install on Python >= 3.9.
    code_path = tfds.core.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        """Raw uint8 tensors (no PNG encoding, so no TensorFlow) and the ten class names."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017), 28x28 grey images of 10 clothing classes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8, encoding="bytes"),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        """One generator per IDX pair in the manual dir."""
        return {split: self._generate_examples(os.fspath(dl_manager.manual_dir), split) for split in IDX_FILES}

    def _generate_examples(self, idx_dir: str, split: str):
        """(index, example) pairs in file order."""
        images_stem, labels_stem = IDX_FILES[split]
        images = read_idx(idx_path(idx_dir, images_stem))
        labels = read_idx(idx_path(idx_dir, labels_stem))
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[:, :, None], "label": int(label)}


@contextlib.contextmanager
def _file_lock(path: str):
    """Hold an exclusive lock on `path` (created if needed) for the duration of the block."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _removed_on_failure(*directories: str):
    """Remove those of `directories` that did not exist before when the block fails (or is interrupted): a cache
    that failed to prepare leaves nothing behind."""
    new = [d for d in directories if not os.path.exists(d)]
    try:
        yield
    except BaseException:
        for directory in new:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def prepared_builder(idx_dir: str | None = None) -> FashionMnistIdx:
    """The builder over the tfds cache, preparing it from `idx_dir` first if it is not there yet.

    A given `idx_dir` must hold the files even when a cache exists, and files other than the default
    ones get a cache of their own (keyed by the directory's path), so `--data-dir` is never ignored."""
    if idx_dir is not None:
        check_idx_dir(idx_dir)
    given = idx_dir is not None and os.path.realpath(idx_dir) != os.path.realpath(DEFAULT_IDX_DIR)
    idx_dir = idx_dir or DEFAULT_IDX_DIR
    cache = tfds_cache_dir()
    if given:
        cache = os.path.join(cache, "from-" + hashlib.sha256(os.path.realpath(idx_dir).encode()).hexdigest()[:16])
    made = (cache, os.path.join(cache, FashionMnistIdx.name), os.path.join(cache, "downloads"))
    with quiet_tfds(), _removed_on_failure(*made):  # before the builder, which makes its directories
        if not FashionMnistIdx(data_dir=cache).is_prepared():
            check_idx_dir(idx_dir)
            check_idx_files(idx_dir)
            print(f"agmc: preparing Fashion-MNIST from {idx_dir} into {cache} (once, ~10 s)", file=sys.stderr,
                  flush=True)
            with _file_lock(os.path.join(cache, "fashion_mnist_idx.lock")):
                config = tfds.download.DownloadConfig(manual_dir=idx_dir, try_download_gcs=False)
                FashionMnistIdx(data_dir=cache).download_and_prepare(file_format="array_record",
                                                                     download_config=config)
        return FashionMnistIdx(data_dir=cache)


@contextlib.contextmanager
def quiet_tfds():
    """tfds's own output held back (banner lines on stdout, progress bars, absl warnings about the folder it is
    about to write): our one line says what is happening. Its temporary files go to a scratch directory that is
    removed: tfds leaves an empty `tmp*tfds` one behind for each builder of a dataset not prepared yet."""
    absl, shown = logging.getLogger("absl"), tqdm_utils._active
    level = absl.level
    absl.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        with tempfile.TemporaryDirectory(prefix="agmc-tfds-") as scratch, contextlib.redirect_stdout(io.StringIO()):
            outer, tempfile.tempdir = tempfile.tempdir, scratch
            try:
                yield
            finally:
                tempfile.tempdir = outer
    finally:
        absl.setLevel(level)
        tfds.display_progress_bar(shown)
