"""A multi-process run's watchdog: each host's `agmc` runs its command in a child process and reports a peer's death
in one line. Without it JAX aborts the survivors with some twenty lines of C++ log and a stack trace when the
coordination service stops hearing a peer's heartbeats.

Everything the child writes passes through as it comes, except JAX's native log lines and the child's own final
error line: those are held until it exits, then shown as they were unless a peer died, which replaces them.
"""
import ctypes
import os
import re
import signal
import subprocess
import sys

SUPERVISED = "AGMC_SUPERVISED"  # set in the child: it runs the command itself
_HELD = re.compile(rb"^([IWEF]\d{4} |\*\*\* |\s+@ |RPC: |The tasks have crashed|Additional GRPC error|:UNKNOWN:|[\d, ]*$|agmc \S+: error: )")
_DEAD = re.compile(rb"stopped sending heartbeats\):\s*\n([\d, ]+)\n")
_LOST = re.compile(rb"distributed service detected fatal errors.*?absl::Status: ([^\n]*)\n(?:\s*\nRPC: \S*/(\w+))?", re.S)


def supervised() -> bool:
    """True in the child of `supervise` (which runs the command) and in any process started without it."""
    return SUPERVISED in os.environ


def supervise(command: str, heartbeat: int) -> int:
    """Run this `agmc` command line again as a child and return its exit status, or 1 with one line naming the peer
    whose death ended it. SIGTERM is passed on; Ctrl-C reaches the child from the terminal itself."""
    child = subprocess.Popen([sys.executable, "-m", "agmc_jax.cli", *sys.argv[1:]], stderr=subprocess.PIPE,
                             env={**os.environ, SUPERVISED: "1"}, preexec_fn=_die_with_parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    held = relay(child.stderr.fileno(), sys.stderr.buffer)
    status = child.wait()
    line = lost_peer(held, heartbeat) if status != 0 else None
    if line is not None:
        print(f"agmc {command}: error: {line}; restart every process (with --resume where the command takes it)",
              file=sys.stderr, flush=True)
        return 1
    sys.stderr.buffer.write(held)
    sys.stderr.flush()
    return status if status >= 0 else 128 - status


def lost_peer(held: bytes, heartbeat: int) -> str | None:
    """What ended the run, from JAX's native log: a peer whose heartbeats stopped, or the coordination service (process
    0) gone; None for any other failure."""
    dead, lost = _DEAD.search(held), _LOST.search(held)
    if dead:
        return (f"process {dead.group(1).decode().strip()} of the run stopped answering (no heartbeat for {heartbeat} "
                "s) and the others cannot go on without it")
    if lost:
        where = f" in {lost.group(2).decode()}" if lost.group(2) else ""
        return (f"lost the run's coordination service ({lost.group(1).decode().split('. ')[0].strip()}{where}): "
                "process 0 died or cannot be reached")
    return None


def _die_with_parent() -> None:
    """In the child before it starts (Linux): killed with its supervisor, as a host's processes die together."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl (macOS): a killed supervisor leaves its child to the peers' heartbeat
        pass


def relay(source: int, target) -> bytes:
    """Copy `source` to `target` until it closes, line by line (a progress bar's carriage returns as they come);
    returns the lines held back."""
    held, pending = [], b""
    while chunk := os.read(source, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if _HELD.match(line):
                held.append(line + b"\n")
            else:
                target.write(line + b"\n")
        if b"\r" in pending:  # a progress bar redrawing its line
            shown, pending = pending.rsplit(b"\r", 1)
            target.write(shown + b"\r")
        target.flush()
    target.write(pending)
    return b"".join(held)
