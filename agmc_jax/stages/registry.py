"""The stage registry of `compress`: named steps, each taking the network the previous one left and adding its
section to the report; `register_stage` adds one from outside the package."""
from pathlib import Path
from typing import Any, Callable, NamedTuple

from agmc_jax.errors import UsageError


class Stage(NamedTuple):
    """One step of `compress`.

    check(config): raise an `AgmcError` for options it cannot run (nothing read, when the config is built);
    check_network(config, network, first): the same for checks that need the input (module, variables, train
    config dict), all run before the first expensive step; `first` says whether the stage reads that network;
    run(run, source, report) -> (report with its section, the directory of the network it leaves), resuming
    from what `run.out` holds when `run.resume`; markdown(report) -> its report section ('' without one);
    outputs: the names it writes in `run.out` besides its own name (a resumed compression refuses an --out holding
    any other); check_resume(run): on resume, raise for what `run.out` holds that the stage would refuse only once
    the stages before it ran again (None: nothing to check).
    """

    check: Callable
    check_network: Callable
    run: Callable
    markdown: Callable
    description: str
    outputs: tuple = ()
    check_resume: Callable | None = None


def _nothing_later(network) -> None:
    return None


class StageRun(NamedTuple):
    """What a stage runs under: the `CompressConfig`, the compression's output directory, whether it resumes, and
    `check_later(network)`: the later stages' `check_network` of the network this stage leaves, which a stage calls
    as soon as that network's shapes are known (before its own training) so a budget only that network cannot meet
    is refused early."""

    config: Any
    out: Path
    resume: bool
    check_later: Callable = _nothing_later


STAGES: dict[str, Stage] = {}


def register_stage(name: str, stage: Stage) -> None:
    """Add (or replace) the stage `name`; stages run in the order they were registered."""
    if not isinstance(stage, Stage):
        raise UsageError(f"register_stage takes a Stage, got {type(stage).__name__}")
    STAGES[name] = stage


def ordered_stages(names) -> tuple:
    """`names` (a sequence or comma-separated text) checked, in the registry's order."""
    names = tuple(s.strip() for s in names.split(",")) if isinstance(names, str) else tuple(names)
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names or len(set(names)) < len(names):
        raise UsageError(f"stages must be some of {', '.join(STAGES)}, each once; got {', '.join(map(str, names))}")
    return tuple(s for s in STAGES if s in names)


def describe_stages() -> str:
    """'name: description' of every registered stage, for help texts."""
    return "; ".join(f"{name}: {stage.description}" for name, stage in STAGES.items())
