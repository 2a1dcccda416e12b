"""Ctrl-C and SIGTERM in the `agmc` command: one line on stderr and exit status 130 or 143, whenever they come.

Python runs a signal handler where the main thread happens to be. Inside a garbage-collector callback (JAX installs
one), a finaliser or an atexit callback, the exception it raises is reported as "ignored" and the program goes on:
the stop is lost (exit 0) or ends in pages of reports. So the first signal raises (`KeyboardInterrupt`, or
`Terminated`) and `finally` blocks run; one swallowed on its way is raised again, unreported; a second signal while
stopping ends the process at once (every write is a rename: nothing is left torn). While the package is imported,
before anything is written, a signal ends the process at once.
"""
import os
import signal
import sys
import threading

STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
INTERRUPTED = "interrupted; what was saved stays (rerun with --resume where the command takes it)"


class Terminated(BaseException):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""


_stopping = {"command": None, "signal": None, "again": False, "said": False, "at_once": True}  # the process's stop


def is_agmc_command() -> bool:
    """Whether this process is the `agmc` command (its script, or `python -m agmc_jax.cli`), or one of its spawned
    children."""
    argv = list(getattr(sys, "orig_argv", ()))
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    script = sys.argv[0] or ""  # a spawned child has its parent's: `agmc`, or cli.py's path under `-m`
    return os.path.basename(script) == "agmc" or module == "agmc_jax.cli" or \
        script.endswith(os.path.join("agmc_jax", "cli.py"))


def stop_now(signum, frame=None):
    """End the process with the interruption's line (once) and status, running nothing more (XLA may still be
    running in its own threads, and the interpreter's teardown under it crashes)."""
    if not _stopping["said"]:
        _stopping["said"] = True
        where = f"agmc {_stopping['command']}" if _stopping["command"] else "agmc"
        line = INTERRUPTED if _stopping["command"] else "interrupted while starting; nothing was written"
        sys.stderr.write(f"{where}: {line}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(STATUS.get(signum, 130))


def guard_startup() -> None:
    """In the `agmc` process, a signal before the command runs (while the package imports) ends it at once. Its
    input workers (multiprocessing children, which import the package too) ignore Ctrl-C: a terminal sends it to
    the whole group, and the command, which stops them, says the one line."""
    if not is_agmc_command() or threading.current_thread() is not threading.main_thread():
        return
    if "--multiprocessing-fork" in getattr(sys, "orig_argv", ()):  # a spawned child, still unpickling its task
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return
    for signum in STATUS:
        signal.signal(signum, stop_now)
    # multiprocessing's resource tracker (started later, inheriting the environment) removes the shared memory of an
    # input pipeline that a stop cut short, and would print two lines about each kind: the stop's line is enough
    os.environ["PYTHONWARNINGS"] = ",".join(
        filter(None, (os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning")))


def _raise(signum, frame):
    """The first signal raises where the program is; a second one, while stopping, ends the `agmc` process."""
    if _stopping["signal"] is not None and not _stopping["again"] and _stopping["at_once"]:
        stop_now(signum)
    _stopping["signal"], _stopping["again"] = signum, False
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _raise_again(previous):
    """An unraisable hook: a stop swallowed by a callback is raised again, unreported (sent to the main thread a
    moment later from another one: raised in the hook itself it would be swallowed too); others go to `previous`."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)) and _stopping["signal"] is not None:
            _stopping["again"] = True
            threading.Timer(0.01, signal.pthread_kill, [threading.main_thread().ident, _stopping["signal"]]).start()
            return
        previous(unraisable)
    return hook


def install(command: str, at_once: bool):
    """Handle SIGINT and SIGTERM for `agmc command` (main thread only); `at_once`: a second signal ends the process
    (not for `main` called inside another program). Returns a function that puts back what was there, or with
    `at_once` leaves handlers that end the process at once: only its exit is left to do."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _stopping.update(command=command, signal=None, again=False, said=False, at_once=at_once)
    previous = {signum: signal.signal(signum, _raise) for signum in STATUS}
    hook = sys.unraisablehook
    sys.unraisablehook = _raise_again(hook)

    def restore():
        for signum, old in previous.items():
            signal.signal(signum, stop_now if at_once else old)
        sys.unraisablehook = hook
    return restore
