"""Durable outputs: orbax checkpoints of any pytree, numbered by step, with JSON metadata, and atomic files.

Training state, search state and saved networks use these functions. Every step's files get a SHA-256
manifest (`.sha256/STEP.json`) when written and are checked against it when read, so flipped bytes are a
`CheckpointError`, never silently different numbers. Reading never modifies a checkpoint directory (the
manager is opened read-only), read failures are `CheckpointError`s, and
orbax's log chatter (absl warnings, asyncio task errors) is held back: what matters reaches the
caller as the error. Files and directories are written under a temporary name and renamed into
place, so a process killed at any moment leaves either the old output or the new one.
"""
import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from agmc_jax.errors import CheckpointError, CheckpointWarning

LOCK = ".lock"  # in an output directory: held (flock) by the process writing it, holding its pid
MANIFESTS = ".sha256"  # per checkpoint directory: STEP.json, {relative file path: sha256} of that step's files


class _Held(logging.Filter):
    """Drops the records of the loggers it filters, keeping those at ERROR or above."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def filter(self, record):
        if record.levelno >= logging.ERROR:
            self.errors.append(record.getMessage())
        return False


@contextlib.contextmanager
def _quiet():
    """absl's (orbax's) and asyncio's log records held back; yields the errors orbax logged and went on after."""
    held, loggers = _Held(), [logging.getLogger(name) for name in ("absl", "asyncio")]
    for logger in loggers:
        logger.addFilter(held)
    try:
        yield held.errors
    finally:
        for logger in loggers:
            logger.removeFilter(held)


def _manager(directory, read_only: bool, keep: int | None = None) -> ocp.CheckpointManager:
    """An orbax manager on `directory`; read-only managers neither create nor clean up files. No step's
    metadata is read when it opens, so one unreadable step does not hide the others."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           save_interval_steps=0 if read_only else 1, lightweight_initialize=True,
                                           cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def _first_line(error: Exception | str) -> str:
    """The first line of an error's message (orbax and tensorstore messages run to pages), without object reprs."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line.split(" <bound method")[0].split(" <function")[0][:200]
    return line if isinstance(error, str) else f"{type(error).__name__}: {line}"


def _unreadable(directory, step: int, reason: str) -> CheckpointError:
    """The error for a checkpoint that orbax cannot read back; `reason` stays readable as an attribute."""
    error = CheckpointError(f"checkpoint {Path(directory) / str(step)} is corrupt or belongs to another network "
                            f"({reason}); delete it or restore another step")
    error.reason = reason
    return error


def _closed_loop_reports_dropped():
    """Drop Python's reports of tensorstore callbacks into orbax's closed event loop (others go on as before).

    After a failed read orbax closes its event loop while tensorstore finishes the reads it started;
    each late callback, even after the read has returned, is reported as an unraisable 'Event loop is
    closed', which means nothing. Installed once, before the first read."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _reading(directory, step: int):
    """Orbax reads of `step`: any failure, raised or only logged, becomes one `CheckpointError`.

    A failed read can leave asyncio tasks in reference cycles that report their errors only when
    collected; collecting them first, held back, keeps such a late report from being taken for this
    read's failure (a valid checkpoint called corrupt)."""
    _closed_loop_reports_dropped()
    with _quiet():
        gc.collect()
    with _quiet() as errors:
        try:
            yield
        except CheckpointError:
            raise
        except Exception as error:  # orbax and tensorstore raise many unrelated types on bad files
            raise _unreadable(directory, step, _first_line(error)) from error
    if errors:
        raise _unreadable(directory, step, _first_line(errors[0]))


def steps(directory) -> list[int]:
    """The complete checkpoints' steps in `directory`, oldest first ([] when there is none)."""
    if not Path(directory).is_dir():
        return []
    try:
        with _quiet(), _manager(directory, read_only=True) as manager:
            return sorted(manager.all_steps())
    except Exception as error:  # a directory orbax cannot list
        raise CheckpointError(f"{directory} cannot be read as checkpoints ({_first_line(error)}); "
                              "delete it or fix the path") from error


def latest_step(directory) -> int | None:
    """The newest complete checkpoint's step in `directory`, or None when there is none."""
    found = steps(directory)
    return found[-1] if found else None


def save(directory, step: int, pytree, metadata: dict | None = None, keep: int | None = None) -> None:
    """Write `pytree` (and JSON-able `metadata`) as checkpoint `step`, keeping the newest `keep` steps.

    Orbax writes the step under a temporary name and renames it when complete; the manifests' folder is made
    first, so a step that is killed before its manifest is written is never taken for an older agmc's."""
    manifests = Path(directory) / MANIFESTS
    try:
        if jax.process_index() == 0 and not manifests.is_dir():
            _adopt(directory)
        with _quiet(), _manager(directory, read_only=False, keep=keep) as manager:
            manager.save(step, args=ocp.args.StandardSave(pytree), custom_metadata=metadata or {}, force=True)
            manager.wait_until_finished()
            kept = set(manager.all_steps())
    except Exception as error:  # orbax and tensorstore report a full disk or a read-only path in many types
        raise CheckpointError(f"cannot write checkpoint {Path(directory) / str(step)} ({_first_line(error)}); free "
                              "space or fix the path, then rerun (with --resume where the command takes it)") from error
    if jax.process_index() != 0:  # orbax has finished every process's part: process 0 writes the manifest
        return
    write_text(manifests / f"{step}.json", json.dumps(_digests(Path(directory) / str(step))))
    for stale in manifests.glob("*.json"):  # the steps `keep` removed
        if stale.stem.isdigit() and int(stale.stem) not in kept:
            stale.unlink()


def _adopt(directory) -> None:
    """Make `directory`'s manifests folder, with a manifest for each step an older agmc wrote there without one (read
    unverified, with a warning, by the run that now continues them): from here on a step without one is unverified."""
    manifests = Path(directory) / MANIFESTS
    manifests.mkdir(parents=True)
    finished = [p for p in Path(directory).iterdir() if p.is_dir() and p.name.isdigit()] if Path(directory).is_dir() \
        else []  # orbax's renamed (complete) steps, listed without a manager: one opens on every process together
    for step in finished:
        write_text(manifests / f"{step.name}.json", json.dumps(_digests(step)))


def digest(*trees) -> str:
    """A short hash of arrays' bytes, for fingerprints: resuming with other weights or other data is refused."""
    sha = hashlib.sha256()
    for leaf in jax.tree.leaves(trees):
        sha.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return sha.hexdigest()[:16]


def _digests(root: Path) -> dict:
    """{path relative to `root`: sha256} of every file under `root`."""
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[str(path.relative_to(root))] = digest.hexdigest()
    return digests


_UNVERIFIED = set()  # directories of steps without manifests that this process has warned about


def _unverified(directory) -> None:
    """Warn once per directory that its checkpoints, written before manifests existed, are read unverified."""
    directory = Path(directory).absolute()
    if directory not in _UNVERIFIED:
        _UNVERIFIED.add(directory)
        warnings.warn(f"{directory} has no checksum manifests (written by an older agmc): its checkpoints are read "
                      "unverified; train or search again into a new directory to have them checked",
                      CheckpointWarning, stacklevel=4)


def _verify(directory, step: int) -> None:
    """Raise the unreadable-checkpoint error when a file of `step` differs from its manifest or the manifest is
    missing where the directory has manifests (`save` makes the folder before the step: a step killed before its
    manifest, or one copied in, is unverified); a directory without any (an older agmc's) is read with one warning."""
    manifests = Path(directory) / MANIFESTS
    manifest = manifests / f"{step}.json"
    if not manifest.exists():
        if manifests.is_dir():
            error = _unreadable(directory, step, f"it has no checksum manifest {manifest}, so its files cannot be "
                                                 "verified")
            error.unverified = True
            raise error
        _unverified(directory)
        return
    try:
        expected = json.loads(manifest.read_text())
    except ValueError:
        raise _unreadable(directory, step, f"its manifest {manifest} is corrupt") from None
    found = _digests(Path(directory) / str(step))
    changed = sorted(name for name, digest in expected.items() if found.get(name) != digest)
    if changed:
        raise _unreadable(directory, step, f"{changed[0]} is not the file that was written (SHA-256 differs)")


def delete(directory, step: int) -> None:
    """Remove checkpoint `step` from `directory` (an unreadable one, before its step is written again); process 0
    removes it, every process waits for that."""
    if jax.process_index() == 0:
        shutil.rmtree(Path(directory) / str(step))
        (Path(directory) / MANIFESTS / f"{step}.json").unlink(missing_ok=True)
    _barrier(f"deleted {directory}/{step}")


def restore_newest(directory, read):
    """(step, read(step)) of the newest checkpoint in `directory` that reads back, None when there is none.

    Newer steps that cannot be read (corrupt, cut short, bytes changed) are passed over with one warning and
    removed, so the run continues from the older one; errors `read` raises for other reasons (a foreign run)
    propagate. All steps unreadable is a `CheckpointError`, unless none has a manifest (a run killed after its
    first step and before that step's manifest): those are removed with one warning and the run starts over."""
    lost = []
    for step in reversed(steps(directory)):
        try:
            value = read(step)
        except CheckpointError as error:
            if not hasattr(error, "reason"):
                raise
            lost.append((step, error))
            continue
        if lost:
            warnings.warn(f"resuming from checkpoint {step} of {directory}: the unreadable newer step(s) "
                          f"{', '.join(str(s) for s, _ in lost)} are removed and their work done again "
                          f"({lost[0][1].reason})", CheckpointWarning, stacklevel=3)
            for bad, _ in lost:
                delete(directory, bad)
        return step, value
    if lost and all(getattr(error, "unverified", False) for _, error in lost):
        warnings.warn(f"starting over in {directory}: its step(s) {', '.join(str(s) for s, _ in lost)} have no "
                      "checksum manifest (killed before it was written) and are removed", CheckpointWarning,
                      stacklevel=3)
        for bad, _ in lost:
            delete(directory, bad)
        return None
    if lost:
        raise CheckpointError(f"no readable checkpoint in {directory} ({lost[0][1].reason}); delete "
                              f"{Path(directory).parent} to start over")
    return None


def _checked_step(directory, step: int | None) -> int:
    """`step`, or the latest one, after checking that the directory holds it."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}: train first or fix the path")
    found = steps(directory)
    if not found:
        raise CheckpointError(f"no checkpoint in {directory}: train first or point at a directory with one")
    if step is None:
        return found[-1]
    if step not in found:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; available: "
                              f"{', '.join(map(str, found))}")
    return step


def _abstract(target):
    """Shape/dtype/sharding leaves for orbax; leaves without a sharding go to the first local device."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                       or default), target)


def restore(directory, step: int | None = None, target=None):
    """Checkpoint `step` (default: latest) as a pytree shaped, typed and sharded like `target`."""
    step = _checked_step(directory, step)
    _verify(directory, step)
    args = ocp.args.StandardRestore(None if target is None else _abstract(target))
    with _reading(directory, step), _manager(directory, read_only=True) as manager:
        return manager.restore(step, args=args)


def metadata(directory, step: int | None = None) -> dict:
    """The JSON metadata saved with checkpoint `step` (default: latest)."""
    step = _checked_step(directory, step)
    _verify(directory, step)
    with _reading(directory, step), _manager(directory, read_only=True) as manager:
        return dict(manager.metadata(step).custom_metadata or {})


def _partial(path: Path, suffix: str) -> Path:
    """A hidden sibling of `path` that a write goes through (a fixed name: a rerun replaces what a kill left)."""
    return path.with_name(f".{path.name}.{suffix}")


def write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` under a temporary name, then rename it into place (replacing any old file); in a
    multi-process run process 0 writes, the others (computing the same) do not."""
    if jax.process_index() != 0:
        return
    path = Path(path)
    partial = _partial(path, "partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_text(path, text: str) -> None:
    """`write_bytes` for UTF-8 text."""
    write_bytes(path, text.encode())


@contextlib.contextmanager
def new_directory(path, replace: bool = False):
    """Yields an empty temporary sibling of `path` to write into; when the block ends it becomes `path` by a
    rename, replacing an existing `path` only if it is an empty directory or `replace` (a run's own earlier
    output, rewritten on resume)."""
    path = Path(path)
    partial, old = _partial(path, "partial"), _partial(path, "old")
    if path.exists() and not replace and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path} already exists; choose a new --out")
    first = jax.process_index() == 0  # process 0 moves directories; every process writes its checkpoint shards
    if first:
        for stale in (partial, old):  # what a killed write left
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(f"new {path}")
    try:
        yield partial
    except BaseException:
        if first:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    _barrier(f"written {path}")
    if first and path.exists():
        os.rename(path, old)
        os.rename(partial, path)
        shutil.rmtree(old)
    elif first:
        os.rename(partial, path)
    _barrier(f"renamed {path}")


def _barrier(name: str) -> None:
    """Wait for every process of a multi-process run (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


_HELD = {}  # output directories this process holds: path -> open lock file


def check_free(directory) -> None:
    """Raise the one-line `CheckpointError` of `locked` when another live process holds `directory`'s lock (reads
    nothing else): what a command checks before it judges what the directory holds."""
    path = Path(directory).absolute() / LOCK
    if not path.is_file() or path.parent in _HELD:
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = handle.read().strip()
            raise CheckpointError(f"{path.parent} is in use by another agmc process{f' (pid {owner})' if owner else ''}"
                                  "; wait for it to finish or choose another output directory") from None


@contextlib.contextmanager
def locked(directory):
    """Hold `directory`'s lock while the block writes it (re-entrant in one process; process 0 of a multi-process
    run takes it): a second process on the same output stops at once with one line naming the holder's pid."""
    path = Path(directory).absolute()
    if path not in _HELD:
        _barrier(f"lock {path}")  # every process has checked the output before any writes to it
    if path in _HELD or jax.process_index() != 0:
        yield
        return
    created = []  # the directories the lock makes, innermost first
    for directory in (path, *path.parents):
        if directory.exists():
            break
        created.append(directory)
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise CheckpointError(f"{directory} is in use by another agmc process{f' (pid {owner})' if owner else ''}; "
                              "wait for it to finish or choose another output directory") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[path] = handle
    try:
        yield
    finally:
        del _HELD[path]
        handle.truncate(0)  # a finished run leaves the lock file empty
        handle.close()  # releases the flock
        if created and [p.name for p in path.iterdir()] == [LOCK]:  # a run refused before writing: as it was
            (path / LOCK).unlink()
            for directory in created:
                if not any(directory.iterdir()):
                    directory.rmdir()
