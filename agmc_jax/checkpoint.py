"""Orbax checkpoints of any pytree, numbered by step, with JSON metadata; read failures are CheckpointErrors.

Training state and search state both use these four functions. Reading never modifies a checkpoint
directory (the manager is opened read-only).
"""
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from agmc_jax.errors import CheckpointError


def _manager(directory, read_only: bool, keep: int | None = None) -> ocp.CheckpointManager:
    """An orbax manager on `directory`; read-only managers neither create nor clean up files."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           save_interval_steps=0 if read_only else 1)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def _first_line(error: Exception) -> str:
    """The first line of an error's message (orbax and tensorstore messages run to pages)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _unreadable(directory, step: int, error: Exception) -> CheckpointError:
    """The error for a checkpoint that orbax cannot read back."""
    return CheckpointError(f"checkpoint {Path(directory) / str(step)} is corrupt or belongs to another network "
                           f"({_first_line(error)}); delete it or restore another step")


def latest_step(directory) -> int | None:
    """The newest complete checkpoint's step in `directory`, or None when there is none."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory, read_only=True) as manager:
        return manager.latest_step()


def save(directory, step: int, pytree, metadata: dict | None = None, keep: int | None = None) -> None:
    """Write `pytree` (and JSON-able `metadata`) as checkpoint `step`, keeping the newest `keep` steps."""
    with _manager(directory, read_only=False, keep=keep) as manager:
        manager.save(step, args=ocp.args.StandardSave(pytree), custom_metadata=metadata or {}, force=True)
        manager.wait_until_finished()


def _checked_step(manager: ocp.CheckpointManager, directory, step: int | None) -> int:
    """`step`, or the latest one, after checking that the directory holds it."""
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}: train first or point at a directory with one")
    if step is None:
        return max(steps)
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; available: "
                              f"{', '.join(map(str, sorted(steps)))}")
    return step


def _abstract(target):
    """Shape/dtype/sharding leaves for orbax; leaves without a sharding go to the first local device."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                       or default), target)


def restore(directory, step: int | None = None, target=None):
    """Checkpoint `step` (default: latest) as a pytree shaped, typed and sharded like `target`."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}: train first or fix the path")
    with _manager(directory, read_only=True) as manager:
        step = _checked_step(manager, directory, step)
        args = ocp.args.StandardRestore(None if target is None else _abstract(target))
        try:
            return manager.restore(step, args=args)
        except Exception as error:  # orbax and tensorstore raise many unrelated types on bad files
            raise _unreadable(directory, step, error) from error


def metadata(directory, step: int | None = None) -> dict:
    """The JSON metadata saved with checkpoint `step` (default: latest)."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}: train first or fix the path")
    with _manager(directory, read_only=True) as manager:
        step = _checked_step(manager, directory, step)
        try:
            return dict(manager.metadata(step).custom_metadata or {})
        except Exception as error:  # orbax raises many unrelated types on bad files
            raise _unreadable(directory, step, error) from error
