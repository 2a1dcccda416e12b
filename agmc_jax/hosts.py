"""Many hosts: join this process to a multi-process run (`jax.distributed`) before anything computes.

One process runs per host; they form one mesh over every device, each reads its shard of the data, and only
process 0 writes logs, reports and exports (`train`, `checkpoint.locked`). CPU devices talk through gloo.
"""
import hashlib
import os
import re

import jax
import numpy as np

from agmc_jax.errors import UsageError

HEARTBEAT_SECONDS = 60  # a peer silent this long has died: the others stop, naming it ($AGMC_HEARTBEAT_SECONDS)


def heartbeat_seconds() -> int:
    """How long a silent peer is waited for: $AGMC_HEARTBEAT_SECONDS (a whole number of seconds), else 60."""
    text = os.environ.get("AGMC_HEARTBEAT_SECONDS", str(HEARTBEAT_SECONDS))
    if not text.strip().isdigit() or int(text) < 1:
        raise UsageError(f"$AGMC_HEARTBEAT_SECONDS must be a whole number of seconds, got {text!r}")
    return int(text)


_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):([0-9]{1,5})")


def check_coordinator(address: str) -> None:
    """Raise a `UsageError` unless `address` is HOST:PORT with a port in 1..65535 (gRPC, given another, may crash
    the process instead of failing)."""
    match = _ADDRESS.fullmatch(address.strip()) if isinstance(address, str) else None
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise UsageError(f"--coordinator must be HOST:PORT with a port in 1..65535 (e.g. 10.0.0.1:1234 or "
                         f"[::1]:1234), got {address!r}")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout: int = 300) -> None:
    """Join the run coordinated at `coordinator` (HOST:PORT) as process `process_id` of `num_processes`; with no
    coordinator, what the platform tells JAX (Cloud TPU, SLURM, ...)."""
    given = [value is not None for value in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise UsageError("--coordinator, --num-processes and --process-id go together (or none of them, where the "
                         "platform tells JAX)")
    if num_processes is not None and not (num_processes >= 1 and 0 <= process_id < num_processes):
        raise UsageError(f"--process-id must be in [0, {num_processes}) and --num-processes at least 1, got "
                         f"{process_id} of {num_processes}")
    if coordinator is not None:
        check_coordinator(coordinator)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=heartbeat_seconds())
    except (RuntimeError, ValueError) as error:
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot join the multi-process run{f' at {coordinator}' if coordinator else ''} ({line}); "
                         "start every process with the same --coordinator and --num-processes") from error


def check_same_options(text: str) -> None:
    """Raise a `UsageError` on every process unless all of them were started with the same `text` (their options):
    processes that disagree would compute different programs and wait on each other for ever."""
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint32)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    differing = [i for i, row in enumerate(every) if not np.array_equal(row, every[0])]
    if differing:
        raise UsageError(f"process {differing[0]} was started with other options than process 0; start every process "
                         "with the same command (only --process-id differs)")


def place(tree, shardings):
    """`tree`'s host arrays (the same on every process) as global arrays laid out by `shardings` (a prefix of
    `tree`): each process puts only the shards its own devices hold, so a split over hosts needs no transfer."""
    def put(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(lambda sharding, subtree: jax.tree.map(lambda value: put(value, sharding), subtree),
                        shardings, tree, is_leaf=lambda node: isinstance(node, jax.sharding.Sharding))
