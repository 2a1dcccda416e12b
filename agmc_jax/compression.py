"""`compress`: a network (a trained workdir, or a user's module, variables and data) through the registered stages
of a `CompressConfig` to a report and a compressed network; `agmc compress` and `agmc reproduce` call it."""
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from agmc_jax import checkpoint
from agmc_jax.data import DatasetSpec, check_splits, dataset_spec, load, register_dataset
from agmc_jax.errors import BudgetError, CheckpointError, InputShapeError, UsageError
from agmc_jax.models import ModelSpec, register_model
from agmc_jax.networks import accuracies, check_new_output, float_bytes, load_network, save_network
from agmc_jax.report import title_markdown
from agmc_jax.search.rerank import RERANK_STEPS
from agmc_jax.stages import STAGES, StageRun, ordered_stages
from agmc_jax.stages.autocompress import AUTOCOMPRESS
from agmc_jax.train import TrainConfig, config_to_dict, resolve_config


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """Every option of a compression: its stages and their settings (the names of `agmc compress`'s flags).

    Built checked: a budget outside (0, 1), an unknown stage, method or reward, or any option a stage cannot run
    raises an `AgmcError` here, before anything is read. Budgets stay fractions of the input network's cost.
    `method="autocompress"` stands for the autocompress stage in place of prune (the command line's spelling)."""

    stages: tuple = ("prune",)
    method: str = "agmc"  # the prune stage's search (see `agmc search --help`)
    kind: str | None = None  # the prune stage's compression kind in place of the method's (KINDS)
    target_macs: float | None = None
    target_params: float | None = None
    episodes: int = 100
    seed: int = 0  # the search's, and the fine-tunes' data order
    reward: str = "acc"
    reward_images: int = 1000
    reward_steps: int | None = None
    reward_lr: float | None = None
    reward_dtype: str = "float32"
    fill: bool | None = None
    rerank: int = 4  # the proxy study: 128 masked SGD steps rank fine-tuned accuracy best; the rule's policy is one
    rerank_steps: int = RERANK_STEPS
    lbound: float = 0.2
    round_to: int | None = None
    criterion: str | None = None  # None: the kind's first (lstsq for channels: the study's best cheap proxy)
    recalibrate_bn: bool = True
    agent_option: tuple = ()  # KEY=VALUE strings, or a dict
    kind_option: tuple = ()  # the prune stage's kind options: KEY=VALUE strings, or a dict
    warmup_episodes: int | None = None
    sigma_decay: float | None = None
    finetune_epochs: int = 1
    lr: float = 0.02
    quant_method: str = "ppo"
    quant_target_size: float = 0.25
    quant_min_bit: int | None = None
    quant_max_bit: int | None = None
    qat_epochs: int = 1
    data_dir: str | None = None
    data_workers: int | None = None  # input processes of the prune and quantize fine-tunes (None: the dataset's)

    def __post_init__(self):
        set_field = object.__setattr__.__get__(self)
        for name in ("agent_option", "kind_option"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (dict, tuple, list)):
                raise UsageError(f"{name} must be a dict or KEY=VALUE strings, got {value!r}")
            set_field(name, tuple(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else tuple(value))
        stages = ordered_stages(self.stages)
        if self.method == AUTOCOMPRESS:
            stages = ordered_stages(tuple(AUTOCOMPRESS if s == "prune" else s for s in stages))
        elif AUTOCOMPRESS in stages:
            set_field("method", AUTOCOMPRESS)
        set_field("stages", stages)
        if {"prune", AUTOCOMPRESS} <= set(stages):
            raise UsageError("autocompress prunes by itself: give --stages prune or --stages autocompress, not both")
        if AUTOCOMPRESS in stages and "quantize" in stages:
            raise UsageError("the quantize stage reads a slimmed network; it does not follow autocompress (whose "
                             "column export keeps zeros in place): compress with one, then quantize its output")
        for name in ("target_macs", "target_params", "quant_target_size"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
                raise BudgetError(f"--{name.replace('_', '-').replace('quant-', '')} must be a fraction in (0, 1), "
                                  f"got {value!r}")
        for name in ("finetune_epochs", "qat_epochs", "episodes", "reward_images"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number of at least 1, "
                                 f"got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive finite number, got {self.lr!r}")
        for stage in stages:
            STAGES[stage].check(self)

    @classmethod
    def from_options(cls, options) -> "CompressConfig":
        """A config from a mapping or namespace holding some of its fields (others: defaults); an unknown name in a
        mapping is a `UsageError` naming the valid ones."""
        values = dict(options) if isinstance(options, dict) else vars(options)
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(options, dict):
            unknown = sorted(set(values) - names)
            if unknown:
                raise UsageError(f"compress has no option {unknown[0]}; valid: {', '.join(sorted(names))}")
        return cls(**{name: value for name, value in values.items() if name in names})


COMPRESS_OPTIONS = {f.name: f.default for f in dataclasses.fields(CompressConfig)}


class Compressed(NamedTuple):
    """What `compress` returns: the final network (module, variables), the report and the directory holding it."""

    module: Any
    variables: Any
    report: dict
    network: Path


def compress(config: CompressConfig, out, *, workdir=None, module=None, variables=None, data=None,
             resume=False) -> Compressed:
    """Run `config`'s stages on a network and write `report.json` and `report.md` in `out`.

    The network is a trained `workdir` (`agmc train`'s, or any network directory), or a user's Linen `module` and
    `variables` with `data`: a dataset name (tfds, or one added by `data.register_dataset`) or a mapping from
    'train', 'validation' and 'test' to (uint8 NHWC images, integer labels). Every option and the input are checked
    before the first expensive step. With `resume` every stage continues from what `out` holds."""
    if not isinstance(config, CompressConfig):
        raise UsageError(f"compress takes a CompressConfig, got {type(config).__name__}")
    out = Path(out)
    user = [given is not None for given in (module, variables, data)]
    if (workdir is not None) == any(user) or any(user) != all(user):
        raise UsageError("give compress either workdir= (a trained network directory) or module=, variables= and "
                         "data=")
    writes = ("report.json", "report.md", "baseline", *STAGES, *(name for s in STAGES.values() for name in s.outputs))
    if module is not None:
        workdir = out / "baseline"
        check_new_output(workdir, out, resume, "compress", writes)
        network = _user_network(module, variables, data, config.seed)
    else:
        check_new_output(workdir, out, resume, "compress", writes)
        network = load_network(workdir)
    for i, stage in enumerate(config.stages):
        STAGES[stage].check_network(config, network, i == 0)
        if resume and STAGES[stage].check_resume is not None:
            STAGES[stage].check_resume(StageRun(config, out, resume))
    train_config = network[2]
    load(train_config["dataset"], "validation", config.data_dir or train_config["data_dir"])  # the reward data found
    with checkpoint.locked(out):
        if module is not None:
            _save_baseline(workdir, network)
        return _run_stages(config, out, Path(workdir), network, resume)


def _run_stages(config, out: Path, workdir: Path, network, resume) -> Compressed:
    """The baseline's accuracy, every stage, the report: `compress` once its input is checked."""
    module, variables, train_config = network
    total = len(config.stages) + 2
    print(f"[1/{total}] baseline {train_config['model']} on {train_config['dataset']}", flush=True)
    report = {"model": train_config["model"], "dataset": train_config["dataset"], "stages": list(config.stages),
              "method": config.method if config.stages[0] != "quantize" else config.quant_method,
              "accuracy": {"dense": accuracies(module, variables, train_config, config.data_dir)},
              "size_bytes_float32": float_bytes(variables)}
    source = workdir
    for number, stage in enumerate(config.stages, 2):
        later = config.stages[number - 1:]
        run = StageRun(config, out, resume, lambda left, later=later: [
            STAGES[name].check_network(config, left, name == later[0]) for name in later])
        print(f"[{number}/{total}] {stage}", flush=True)
        report, source = STAGES[stage].run(run, source, report)
    print(f"[{total}/{total}] report", flush=True)
    text = title_markdown(report) + "".join(STAGES[stage].markdown(report) for stage in config.stages)
    checkpoint.write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    checkpoint.write_text(out / "report.md", text)
    print(text)
    final_module, final_variables, _ = load_network(source)
    return Compressed(final_module, final_variables, report, source)


def _user_network(module, variables, data, seed) -> tuple:
    """(module, variables, train config dict) of the user's network, its module registered as a model and its
    arrays as a dataset (in this process), after checking that the module applies the variables to the data."""
    dataset = data if isinstance(data, str) else _register_arrays(data)
    spec = dataset_spec(dataset)
    name = type(module).__name__
    register_model(name, ModelSpec(lambda num_classes=None, **kwargs: module, tuple(spec.input_shape),
                                   spec.num_classes, 1))
    variables = jax.device_get(dict(variables))
    try:
        jax.eval_shape(lambda v: module.apply(v, np.zeros((1, *spec.input_shape), np.float32), train=False),
                       variables)
    except Exception as error:  # flax and jax raise many kinds for a module that cannot take these variables
        raise InputShapeError(f"the module cannot apply these variables to {dataset} inputs of shape "
                              f"{tuple(spec.input_shape)} with train=False: {str(error).splitlines()[0]}") from error
    return module, variables, config_to_dict(resolve_config(TrainConfig(model=name, dataset=dataset, epochs=1,
                                                                        seed=seed)))


def _save_baseline(path: Path, network) -> None:
    """The user's network saved as the network directory `path` that the stages read; a resumed run checks that
    `path` holds these very variables."""
    module, variables, config = network
    if (path / "network.json").exists():
        saved = load_network(path)[1]
        same = jax.tree.structure(saved) == jax.tree.structure(variables) and all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(variables)))
        if not same:
            raise CheckpointError(f"{path} holds other variables than these; choose a new out to compress them")
        return
    with checkpoint.new_directory(path) as partial:
        save_network(partial, "dense", config, variables, {"source": f"compress(module={type(module).__name__}(...))"})


def _register_arrays(splits) -> str:
    """Register (uint8 images, labels) per split as a dataset named by their digest; returns the name."""
    if not hasattr(splits, "items"):
        raise UsageError(f"data must be a dataset name or a mapping of train, validation and test to (images, labels), "
                         f"got {type(splits).__name__}")
    try:
        arrays = {split: (np.asarray(pair[0]), np.asarray(pair[1])) for split, pair in splits.items()}
    except (TypeError, IndexError, KeyError) as error:
        raise UsageError(f"each split of data must be (images, labels): {error}") from None
    name = f"arrays-{checkpoint.digest(arrays)[:10]}"
    check_splits(name, arrays)
    train = arrays["train"][0]
    pixels = train.reshape(-1, train.shape[-1]).astype(np.float64) / 255
    classes = 1 + max(int(np.max(labels, initial=0)) for _, labels in arrays.values())
    std = np.where(pixels.std(0) > 0, pixels.std(0), 1.0)
    spec = DatasetSpec(classes, tuple(train.shape[1:]), tuple(pixels.mean(0)), tuple(std), "none",
                       len(arrays["validation"][0]))
    register_dataset(name, spec, arrays)
    return name
