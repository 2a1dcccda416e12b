"""The grain input pipeline: the batches of the NumPy batcher it replaced, bit for bit, over processes and worker
counts; a training run killed mid-epoch resumes to the uninterrupted run's variables; --data-workers is checked."""
import dataclasses
import itertools
import json
import multiprocessing
import os
import signal

import jax
import numpy as np
import pytest

from agmc_jax import checkpoint, data, train as training
from agmc_jax.cli import main
from agmc_jax.data.pipeline import batch_uniforms, epoch_order, process_slice, steps_per_epoch
from agmc_jax.data.transforms import normalize, preprocess
from agmc_jax.errors import AgmcError, UsageError
from agmc_jax.train import TrainConfig, abstract_train_state, build_module, resolve_config, train
from tests.test_train import CONFIG, SOURCES


def numpy_batches(source, spec, batch_size, *, train, seed=0, epoch=0, drop_remainder=True, process_index=0,
                  process_count=1):
    """The synchronous NumPy batcher that grain replaced (agmc_jax/data/pipeline.py before it), as the oracle."""
    order = epoch_order(len(source), seed, epoch) if train else np.arange(len(source))
    stop = steps_per_epoch(source, batch_size) * batch_size if drop_remainder else len(source)
    order = order[:stop]
    for step, start in enumerate(range(0, len(order), batch_size)):
        global_indices = order[start:start + batch_size]
        part = process_slice(len(global_indices), process_index, process_count)
        uniforms = batch_uniforms(seed, epoch, step, len(global_indices))[part] if train else None
        images, labels = source.get(global_indices[part])
        images = preprocess(images, spec.augment, spec.input_shape, uniforms)
        yield {"image": normalize(images, spec.mean, spec.std), "label": labels}


def random_source(n=45, shape=(8, 8, 3), seed=0) -> data.ArraySource:
    rng = np.random.default_rng(seed)
    return data.ArraySource(rng.integers(0, 256, (n, *shape), np.uint8), rng.integers(0, 10, n))


def assert_same(expected, actual):
    expected, actual = list(expected), list(actual)
    assert len(expected) == len(actual) > 0
    for a, b in zip(expected, actual):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("train, drop_remainder", [(True, True), (False, False)])
@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_grain_batches_are_the_numpy_batchers_bit_for_bit_on_each_of_two_processes(name, train, drop_remainder):
    """Training (shuffled, augmented) and evaluation (source order, remainder kept) batches of two epochs."""
    if name == "cifar10":
        source, spec, batch_size = random_source(n=45), data.dataset_spec(name)._replace(input_shape=(8, 8, 3)), 10
    else:  # crops of larger images, resized
        source, spec, batch_size = random_source(n=13, shape=(40, 56, 3)), data.dataset_spec(name)._replace(
            input_shape=(32, 32, 3)), 4
    for index in range(2):
        kwargs = dict(train=train, seed=5, drop_remainder=drop_remainder, process_index=index, process_count=2)
        expected = [b for epoch in (2, 3) for b in numpy_batches(source, spec, batch_size, epoch=epoch, **kwargs)]
        assert_same(expected, data.batches(source, spec, batch_size, epoch=2, epochs=2, **kwargs))


def test_set_state_resumes_at_the_batch_of_get_state():
    source = random_source()
    kwargs = dict(train=True, seed=1, epochs=3, process_index=0, process_count=1)
    whole = list(data.batches(source, "cifar10", 10, **kwargs))
    first = data.batches(source, "cifar10", 10, **kwargs)
    head = list(itertools.islice(first, 5))
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    second = data.batches(source, "cifar10", 10, **kwargs)
    second.set_state(state)
    assert state == {"next_index": 5} and len(second) == len(whole) - 5
    assert_same(whole, head + list(second))


def test_worker_processes_make_the_batches_of_the_training_process():
    """Two workers from a resumed position give the same batches as none (workers are spawned processes that
    import agmc_jax: seconds)."""
    source = random_source()
    kwargs = dict(train=True, seed=4, epochs=2, process_index=1, process_count=2)
    whole = list(data.batches(source, "cifar10", 10, **kwargs))
    with data.batches(source, "cifar10", 10, workers=2, **kwargs) as resumed:
        resumed.set_state({"next_index": 3})
        assert_same(whole[3:], resumed)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_batches_stay_the_same():
    source = random_source()
    kwargs = dict(train=True, seed=4, epochs=40, process_index=0, process_count=1)
    whole = list(data.batches(source, "cifar10", 10, **kwargs))
    with data.batches(source, "cifar10", 10, workers=2, **kwargs) as batches:
        made = list(itertools.islice(batches, 5))
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        with pytest.warns(UserWarning, match="an input worker process died .* starting the workers again"):
            made += list(batches)
    assert_same(whole, made)


def test_default_workers_keep_in_memory_data_in_the_training_process():
    assert data.default_workers(data.dataset_spec("fashion_mnist")) == 0
    assert data.default_workers(data.dataset_spec("cifar10")) == 0
    assert data.default_workers(data.dataset_spec("imagenet2012")) >= 1


@pytest.mark.parametrize("workers", [-1, 1.5, True])
def test_bad_worker_counts_are_typed_errors(workers):
    with pytest.raises(UsageError, match="--data-workers"):
        data.batches(random_source(), "cifar10", 10, train=False, workers=workers)
    with pytest.raises(AgmcError, match="--data-workers"):
        resolve_config(TrainConfig("resnet20", "cifar10", data_workers=workers))


def test_bad_data_workers_on_the_command_line_is_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--model", "lenet5", "--workdir", str(tmp_path / "w"), "--data-workers", "-1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.splitlines()) == 1 and "--data-workers" in err, err
    assert not (tmp_path / "w").exists()


class Killed(Exception):
    """Stands for a kill of the training process."""


def dying_after(steps: int, monkeypatch) -> None:
    """Make `train`'s compiled steps raise `Killed` in place of their (steps + 1)-th call."""
    make = training.make_train_step

    def make_dying(*args, **kwargs):
        step, calls = make(*args, **kwargs), itertools.count(1)

        def run(state, batch, carry=None):
            if next(calls) > steps:
                raise Killed
            return step(state, batch, carry)
        return run

    monkeypatch.setattr(training, "make_train_step", make_dying)


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """Checkpoints every 3 steps of 4-step epochs; killed in step 7 (after the mid-epoch checkpoint of step 6),
    resumed: the variables, step and metrics of one uninterrupted run, which also checkpointed mid-epoch."""
    config = dataclasses.replace(CONFIG, checkpoint_steps=3)
    final = train(config, tmp_path / "whole", SOURCES)
    with monkeypatch.context() as patch:
        dying_after(6, patch)
        with pytest.raises(Killed):
            train(config, tmp_path / "killed", SOURCES)
    directory = tmp_path / "killed" / "checkpoints"
    assert checkpoint.steps(directory) == [3, 4, 6]
    assert checkpoint.metadata(directory)["data"] == {"next_index": 6}
    resumed = train(config, tmp_path / "killed", SOURCES)
    assert resumed == {**final, "seconds": resumed["seconds"]}
    target = abstract_train_state(build_module(resolve_config(config)), resolve_config(config))
    expected = checkpoint.restore(tmp_path / "whole" / "checkpoints", target=target)
    actual = checkpoint.restore(directory, target=target)
    assert int(actual.step) == 8
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # half a minute of training before the signal: run with -m slow
def test_ctrl_c_to_the_group_of_a_run_with_input_workers_is_one_line(tmp_path):
    """A terminal's Ctrl-C reaches the command and its input workers (one process group): the workers stay quiet,
    the resource tracker's notes about the pipeline's shared memory are not shown; one line, status 130."""
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "agmc_jax.cli", "train", "--model", "lenet5", "--dataset",
                                "fashion_mnist", "--epochs", "2", "--data-workers", "2", "--workdir",
                                str(tmp_path / "w")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    time.sleep(30)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("epoch")]
    assert process.returncode == 130 and lines == [
        "agmc train: interrupted; what was saved stays (rerun with --resume where the command takes it)"], err[-2000:]
