"""Reading a grain `MapDataset` in order: in worker processes or threads of this one, prefetched, resumable.

The state of a `BatchIterator` is the index of the next element, `{'next_index': n}`, and nothing else:
the elements are deterministic functions of their index, so a resumed iterator sees what an uninterrupted
one would, whatever the number of workers (grain's own state of a multi-worker iterator holds one entry
per worker and cannot be restored with another count).
"""
import os
import warnings

import grain
from absl import flags

from agmc_jax.data.specs import DatasetSpec
from agmc_jax.errors import UsageError

MAX_WORKERS = 16  # the default's ceiling: more processes than this rarely feed one host faster
THREADS = 1  # threads computing elements ahead, in this process (0 workers) or in each worker
PREFETCH = 2  # elements computed ahead per process: a global batch of ImageNet is large
WORKER_DIED = "Worker process was terminated unexpectedly"  # how grain 0.2.18 reports a worker that died


def default_workers(spec: DatasetSpec) -> int:
    """Worker processes for a dataset when none are given: 0 for images held in memory (a batch costs
    milliseconds and a worker seconds to start), else all cores but one for the training process, at most
    MAX_WORKERS (decoding and cropping JPEGs is the bottleneck)."""
    if spec.augment != "imagenet":
        return 0
    return max(1, min(len(os.sched_getaffinity(0)) - 1, MAX_WORKERS))


def check_workers(workers: int) -> int:
    """`workers`, after checking that it is a count of processes this host can run: at most 4 a core (or
    MAX_WORKERS on a small host); more only take memory (each holds a copy of the pipeline)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"--data-workers must be an integer at least 0 (0: in the training process), got {workers!r}")
    cores = len(os.sched_getaffinity(0))
    limit = max(MAX_WORKERS, 4 * cores)
    if workers > limit:
        raise UsageError(f"--data-workers {workers} is more than this host should start (at most {limit} for its "
                         f"{cores} cores); choose fewer")
    return workers


def _absl_flags_parsed() -> None:
    """Mark absl's flags parsed (at their defaults) when the program has not parsed them: grain 0.2.18 reads a
    flag of its own when it starts worker processes, which raises in programs that do not use absl."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _open(dataset: grain.MapDataset, workers: int) -> grain.DatasetIterator:
    """A grain iterator over `dataset`: `workers` processes each compute every `workers`-th element (0: threads
    of this process), and grain interleaves them back into order."""
    if workers:
        _absl_flags_parsed()
    reading = dataset.to_iter_dataset(grain.ReadOptions(num_threads=THREADS, prefetch_buffer_size=PREFETCH))
    return iter(reading.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


class BatchIterator:
    """The elements of `dataset` from `next_index` on, computed by `workers` processes and prefetched.

    `get_state()` / `set_state()` as grain's iterators (the state is JSON); `close()` (or leaving a `with`
    block) stops the workers. Worker processes start at the first `next`, so `set_state` before it costs
    nothing. A worker that dies (killed, out of memory) is replaced once per element, with a warning: the
    elements do not depend on which process makes them."""

    def __init__(self, dataset: grain.MapDataset, workers: int = 0, next_index: int = 0):
        self.dataset, self.workers, self.next_index = dataset, check_workers(workers), next_index
        self._iterator, self._restarted_at = None, None

    def __iter__(self):
        return self

    def __next__(self):
        """The next element (grain's iterator, and its workers, start at the first call or after `set_state`)."""
        if self.next_index >= len(self.dataset):
            self.close()
            raise StopIteration
        if self._iterator is None:
            self._iterator = _open(self.dataset[self.next_index:], self.workers)
        try:
            element = next(self._iterator)
        except RuntimeError as error:
            if WORKER_DIED not in str(error) or self._restarted_at == self.next_index:
                raise
            warnings.warn(f"an input worker process died ({error.args[0].split('. ')[0].lower()}); starting the "
                          f"workers again at batch {self.next_index}", stacklevel=2)
            self.close()
            self._restarted_at = self.next_index
            return next(self)
        self.next_index += 1
        return element

    def __len__(self) -> int:
        """The number of elements still to come."""
        return max(len(self.dataset) - self.next_index, 0)

    def get_state(self) -> dict:
        """{'next_index': the index of the next element}."""
        return {"next_index": self.next_index}

    def set_state(self, state: dict) -> None:
        """Continue from the element `state['next_index']` (what `get_state` returned, here or in another run)."""
        self.close()
        self.next_index = int(state["next_index"])

    def close(self) -> None:
        """Stop the worker processes and threads (a later `next` starts them again)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
