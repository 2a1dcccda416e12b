"""The data module: the real Fashion-MNIST builder, tfds datasets under mock data, deterministic batches."""
import gzip
import io
import json
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agmc_jax import data
from agmc_jax.data import fashion_mnist, transforms
from agmc_jax.errors import DataError, DataNotFoundError, InputShapeError, UnknownDatasetError, UsageError

IDX_DIR = fashion_mnist.DEFAULT_IDX_DIR


def read_idx_independently(stem: str) -> np.ndarray:
    """A gzipped IDX file's payload, skipping its header by the rank stored in byte 3."""
    with gzip.open(os.path.join(IDX_DIR, stem + ".gz"), "rb") as f:
        raw = f.read()
    return np.frombuffer(raw[4 + 4 * raw[3]:], np.uint8)


@pytest.fixture(scope="module")
def preparation(tmp_path_factory):
    """Our three Fashion-MNIST splits prepared once into a temporary tfds cache; what it printed on stdout and
    stderr, and what it left in the temporary folder."""
    scratch, stdout, stderr = tmp_path_factory.mktemp("temporary"), io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout), redirect_stderr(stderr):
        patch.setenv("AGMC_TFDS_DIR", str(tmp_path_factory.mktemp("tfds")))
        patch.setattr(tempfile, "tempdir", str(scratch))
        splits = {split: data.load("fashion_mnist", split) for split in ("train", "validation", "test")}
        yield splits, stdout.getvalue(), stderr.getvalue(), sorted(scratch.iterdir())


@pytest.fixture(scope="module")
def fashion(preparation):
    return preparation[0]


def test_preparing_says_one_line_and_leaves_no_temporary_folders(preparation):
    _, stdout, stderr, left = preparation
    assert stdout == "" and left == []
    assert len(stderr.splitlines()) == 1 and stderr.startswith("agmc: preparing Fashion-MNIST from"), stderr


def test_fashion_split_sizes(fashion):
    assert {split: len(source) for split, source in fashion.items()} == {
        "train": 55000, "validation": 5000, "test": 10000}


def test_fashion_examples_have_the_spec_shape_and_labels(fashion):
    images, labels = fashion["test"].get(np.arange(10000))
    assert images.dtype == np.uint8 and images.shape == (10000, *data.dataset_spec("fashion_mnist").input_shape)
    assert labels.dtype == np.int32 and labels.min() == 0 and labels.max() == 9


def test_fashion_test_split_keeps_the_idx_order(fashion):
    images, labels = fashion["test"].get(np.arange(3))
    assert labels[0] == read_idx_independently("t10k-labels-idx1-ubyte")[0]
    np.testing.assert_array_equal(images[..., 0], read_idx_independently("t10k-images-idx3-ubyte")[:3 * 784]
                                  .reshape(3, 28, 28))


def test_fashion_train_and_validation_partition_the_idx_train_set(fashion):
    train_images, train_labels = fashion["train"].get(np.arange(55000))
    val_images, val_labels = fashion["validation"].get(np.arange(5000))
    np.testing.assert_array_equal(np.concatenate([train_labels, val_labels]),
                                  read_idx_independently("train-labels-idx1-ubyte"))
    np.testing.assert_array_equal(np.concatenate([train_images, val_images]).reshape(-1),
                                  read_idx_independently("train-images-idx3-ubyte"))


def test_fashion_spec_normalises_the_training_set(fashion):
    batch = next(data.batches(fashion["train"], "fashion_mnist", 55000, train=False))
    assert batch["image"].shape == (55000, 28, 28, 1) and batch["image"].dtype == np.float32
    assert abs(batch["image"].mean()) < 0.01 and abs(batch["image"].std() - 1) < 0.01


def test_fashion_missing_idx_dir_says_how_to_get_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("AGMC_TFDS_DIR", str(tmp_path / "cache"))
    missing = tmp_path / "no-idx-here"
    with pytest.raises(DataNotFoundError) as error:
        data.load("fashion_mnist", "train", data_dir=str(missing))
    message = str(error.value)
    assert "dataset-fashion-mnist" in message and "--data-dir" in message and str(missing) in message
    assert "\n" not in message


def test_read_idx_accepts_plain_files_and_rejects_others(tmp_path):
    (tmp_path / "labels").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x08\x09")
    (tmp_path / "bad").write_bytes(b"not an idx file")
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "labels")), [7, 8, 9])
    with pytest.raises(DataError, match="bad is not an IDX file"):
        fashion_mnist.read_idx(str(tmp_path / "bad"))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UnknownDatasetError, match="fashion_mnist, mnist, cifar10, imagenet2012"):
        data.load("svhn", "train")


def test_unknown_split_is_a_typed_error():
    with pytest.raises(DataNotFoundError, match="train, validation, test"):
        data.load("mnist", "val")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagenet2012"])
def test_unprepared_tfds_dataset_says_what_to_do(name, tmp_path):
    with pytest.raises(DataNotFoundError, match="tfds build") as error:
        data.load(name, "train", data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value)
    assert ("downloads/manual" in str(error.value)) == (name == "imagenet2012")


def test_tfds_dataset_prepared_without_random_access_says_to_rebuild(tmp_path):
    variant = tmp_path / "mnist" / "3.0.1"
    variant.mkdir(parents=True)
    (variant / "dataset_info.json").write_text(json.dumps({"name": "mnist", "version": "3.0.1",
                                                           "fileFormat": "tfrecord"}))
    with pytest.raises(DataNotFoundError, match="prepared as tfrecord.*--file_format=array_record"):
        data.load("mnist", "test", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_small_tfds_datasets_under_mock_data(name):
    spec = data.dataset_spec(name)
    with data.mock_data(num_examples=40):
        for split in ("train", "validation", "test"):
            source = data.load(name, split)
            images, labels = source.get(np.array([3, 0, 3]))
            assert len(source) == 40 and images.shape == (3, *spec.input_shape) and images.dtype == np.uint8
            np.testing.assert_array_equal(images[0], images[2])
            assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < spec.num_classes
        batch = next(data.batches(source, name, 16, train=True))
        assert batch["image"].shape == (16, *spec.input_shape)
        arrays, labels = data.load_arrays(name, "test", limit=5)
        assert arrays.shape == (5, *spec.input_shape) and arrays.dtype == np.float32 and labels.shape == (5,)


def test_imagenet_under_mock_data_is_cropped_to_224():
    with data.mock_data(num_examples=6):
        train, test = data.load("imagenet2012", "train"), data.load("imagenet2012", "test")
        raw, labels = test.get(np.arange(2))
        eval_batch = next(data.batches(test, "imagenet2012", 4, train=False))
        train_batch = next(data.batches(train, "imagenet2012", 4, train=True, seed=1))
        arrays, _ = data.load_arrays("imagenet2012", "validation", limit=3)
    assert isinstance(raw, list) and raw[0].ndim == 3 and labels.dtype == np.int32
    assert eval_batch["image"].shape == train_batch["image"].shape == (4, 224, 224, 3)
    assert arrays.shape == (3, 224, 224, 3)


def test_imagenet_eval_view_resizes_the_shorter_side_then_centre_crops():
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, 300:] = 255
    out = transforms.imagenet_eval(image, 224)
    assert out.shape == (224, 224, 3)
    assert out[:, :100].max() == 0 and out[:, 124:].min() == 255


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(1, 500), st.lists(st.floats(0, 0.999), min_size=transforms.UNIFORMS,
                                                          max_size=transforms.UNIFORMS))
def test_random_resized_box_lies_inside_the_image(height, width, uniforms):
    top, left, h, w = transforms.random_resized_box(height, width, np.array(uniforms))
    assert 0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= height and left + w <= width


def random_source(n: int = 50, shape=(8, 8, 3), seed: int = 0) -> data.ArraySource:
    """A small in-memory source of random images and labels."""
    rng = np.random.default_rng(seed)
    return data.ArraySource(rng.integers(0, 256, (n, *shape), np.uint8), rng.integers(0, 10, n))


def all_batches(source, name="cifar10", batch_size=10, **kwargs):
    """The list of batches of one epoch."""
    return list(data.batches(source, name, batch_size, **kwargs))


def test_training_batches_depend_only_on_seed_and_epoch():
    source = random_source()
    first = all_batches(source, train=True, seed=3, epoch=1, process_count=1, process_index=0)
    again = all_batches(source, train=True, seed=3, epoch=1, process_count=1, process_index=0)
    other = all_batches(source, train=True, seed=3, epoch=2, process_count=1, process_index=0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_an_epoch_visits_every_example_once():
    source = random_source()
    batches = all_batches(source, batch_size=7, train=True, seed=1, drop_remainder=False)
    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels) == sorted(source.labels)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_process_slices_concatenate_to_the_global_batch(train, drop_remainder):
    source = random_source(n=45)
    kwargs = dict(batch_size=10, train=train, seed=5, epoch=2, drop_remainder=drop_remainder)
    whole = all_batches(source, process_index=0, process_count=1, **kwargs)
    parts = [all_batches(source, process_index=i, process_count=2, **kwargs) for i in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == (4 if drop_remainder else 5)
    for batch, first, second in zip(whole, *parts):
        assert len(first["label"]) - len(second["label"]) == len(batch["label"]) % 2
        for key in ("image", "label"):
            np.testing.assert_array_equal(batch[key], np.concatenate([first[key], second[key]]))


def test_evaluation_batches_are_normalised_in_source_order():
    source = random_source()
    spec = data.dataset_spec("cifar10")
    batch = all_batches(source, train=False, process_count=1, process_index=0)[1]
    expected = (source.images[10:20] / 255.0 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch["label"], source.labels[10:20])


@pytest.mark.parametrize("name, flips", [("mnist", False), ("fashion_mnist", True)])
def test_augmentation_is_a_padded_crop_and_flips_only_where_allowed(name, flips):
    source = random_source(n=64, shape=(28, 28, 1))
    batch = all_batches(source, name, 64, train=True, seed=7, process_count=1, process_index=0)[0]
    spec = data.dataset_spec(name)
    pixels = np.rint((batch["image"] * spec.std[0] + spec.mean[0]) * 255).astype(np.uint8)
    order = data.pipeline.epoch_order(64, 7, 0)
    padded = np.pad(source.images[order], ((0, 0), (4, 4), (4, 4), (0, 0)))
    seen_flip = []
    for out, pad in zip(pixels, padded):
        windows = [pad[y:y + 28, x:x + 28] for y in range(9) for x in range(9)]
        plain = any(np.array_equal(out, w) for w in windows)
        flipped = any(np.array_equal(out, w[:, ::-1]) for w in windows)
        assert plain or (flips and flipped)
        seen_flip.append(flipped and not plain)
    assert any(seen_flip) == flips


def test_drop_remainder_and_steps_per_epoch():
    source = random_source(n=25)
    assert data.steps_per_epoch(source, 10) == 2
    assert [len(b["label"]) for b in all_batches(source, train=False)] == [10, 10]
    assert [len(b["label"]) for b in all_batches(source, train=False, drop_remainder=False)] == [10, 10, 5]


def test_bad_batch_arguments_are_typed_errors():
    source = random_source()
    with pytest.raises(InputShapeError):
        data.batches(source, "cifar10", 5, train=False, process_index=0, process_count=2)
    with pytest.raises(InputShapeError):
        data.batches(source, "cifar10", 4, train=False, process_index=2, process_count=2)
    with pytest.raises(InputShapeError):
        next(data.batches(random_source(shape=(8, 8, 1)), "cifar10", 4, train=False))
    with pytest.raises(InputShapeError):
        data.ArraySource(np.zeros((3, 8, 8, 3), np.float32), np.zeros(3))


def _tiny_idx_dir(directory, count=4):
    """The four Fashion-MNIST IDX files (gzipped) of `count` blank images each."""
    directory.mkdir()
    for images_stem, labels_stem in fashion_mnist.IDX_FILES.values():
        for stem, array in ((images_stem, np.zeros((count, 28, 28), np.uint8)),
                            (labels_stem, np.arange(count, dtype=np.uint8))):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
            (directory / f"{stem}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return directory


def test_a_truncated_idx_file_is_one_line_naming_it_and_prepares_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AGMC_TFDS_DIR", str(tmp_path / "cache"))
    idx = _tiny_idx_dir(tmp_path / "idx")
    damaged = idx / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:30])
    with pytest.raises(DataError) as error:
        data.load("fashion_mnist", "train", data_dir=str(idx))
    assert str(damaged) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()


def test_a_preparation_cut_short_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGMC_TFDS_DIR", str(tmp_path / "cache"))
    idx = _tiny_idx_dir(tmp_path / "idx")

    def interrupted(self, **kwargs):
        os.makedirs(os.path.join(self.data_dir, "incomplete.1234"))
        raise KeyboardInterrupt()

    monkeypatch.setattr(fashion_mnist.FashionMnistIdx, "download_and_prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load("fashion_mnist", "train", data_dir=str(idx))
    assert not list((tmp_path / "cache").glob("from-*"))  # the cache of these files: none, not half of one


def test_tfds_decodes_jpegs_with_opencv_the_measured_fastest_and_as_pil_does():
    """opencv-python-headless is a dependency because tfds's data sources decode with it when it is importable
    (experiments/bench_input.py: the least CPU per image of the training view); its pixels are PIL's."""
    import cv2
    from PIL import Image
    from tensorflow_datasets.core.features import image_feature

    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="JPEG", quality=90)
    feature = image_feature.Image(shape=(None, None, 3))
    assert image_feature.cv2 is not None and cv2.__version__
    decoded = feature.decode_example_np(encoded.getvalue())
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")))


def test_more_input_workers_than_the_host_should_start_are_refused():
    """`--data-workers` beyond 4 a core (at least 16) is one line before anything starts, not a fork storm."""
    cores = len(os.sched_getaffinity(0))
    limit = max(16, 4 * cores)
    assert data.check_workers(limit) == limit
    with pytest.raises(UsageError, match=f"--data-workers {limit + 1} is more than this host should start"):
        data.check_workers(limit + 1)
