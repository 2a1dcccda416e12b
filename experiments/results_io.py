"""Where experiments put what they measured: one JSON file per run under `experiments/results/<experiment>/`,
each stamped with the command that made it, the date and the machine. `experiments/render_docs.py` renders the
results pages of the documentation and the README's headline table from these files alone."""
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """'x86_64, 2 CPUs, cpu': the architecture, the CPU count and JAX's default backend (when JAX is loaded)."""
    backend = sys.modules["jax"].default_backend() if "jax" in sys.modules else "jax not loaded"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {backend}"


def stamp() -> dict:
    """The command line that is running (as typed from the repository root), today's date and the machine."""
    return {"command": shlex.join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "machine": machine()}


def write_result(experiment: str, name: str, record: dict) -> Path:
    """Write `record` (with `stamp()` added where it has no such fields) as `results/<experiment>/<name>.json`,
    atomically; `name` may hold '/' for subfolders. Returns the path."""
    path = RESULTS / experiment / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({**stamp(), **record}, indent=1, default=float) + "\n")
    partial.replace(path)
    return path
