"""Supervised training of zoo networks: pure jit-compiled steps, data parallel over every device, resumable.

The state is replicated and each global batch is split over a one-axis `Mesh` ('data') of all
devices, so XLA (GSPMD) computes gradients and BatchNorm statistics over the global batch. Weight
decay (coupled L2, as in PyTorch's SGD) applies to kernels only, not to biases or BatchNorm.

A workdir holds `config.json`, `checkpoints/<step>/` (orbax), `metrics.jsonl`, `tb/` and, once
training is complete, `summary.json`.
"""
import dataclasses
import itertools
import json
import sys
import time
import typing
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tensorboardX import SummaryWriter
from tqdm import tqdm

from agmc_jax import checkpoint, data, runs
from agmc_jax.errors import AgmcError, CheckpointError, InputShapeError
from agmc_jax.hosts import place
from agmc_jax.models import check_input_shape, create_model, init_model

SCHEDULES = ("cosine", "onecycle", "constant")
LOSSES = "losses"  # a module adds terms to its training loss by sowing them into this collection (a KL term, a penalty)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that fixes a training run; `input_shape`/`num_classes` default to the dataset's."""

    model: str
    dataset: str
    epochs: int = 200
    batch_size: int = 128  # global, over all devices and processes
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # kernels only
    schedule: str = "cosine"  # 'cosine' (linear warmup, then cosine to 0), 'onecycle' or 'constant'
    warmup_epochs: int = 0  # 'cosine' only
    seed: int = 0
    data_dir: str | None = None
    input_shape: tuple | None = None
    num_classes: int | None = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    keep: int = 3  # checkpoints kept
    sparse: bool = False  # weights that are zero stay zero (fine-tuning a fine-grained pruned network)
    dtype: str = "float32"  # compute dtype of training and evaluation (DTYPES); parameters stay float32
    data_workers: int | None = None  # input worker processes (0: in the training process; None: data.default_workers)
    checkpoint_steps: int = 0  # also checkpoint every this many steps inside an epoch (0: at epoch ends only)


# Fields that may change when a run resumes: they do not change what the run computes.
RUN_FIELDS = frozenset({"data_dir", "eval_every", "checkpoint_every", "keep", "data_workers", "checkpoint_steps"})


class TrainState(NamedTuple):
    """Everything that changes during training; `batch_stats` is {} for networks without BatchNorm."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


class OptimizerSpec(NamedTuple):
    """The optimizer's hyperparameters; hashable, so compiled steps take it as a static argument."""

    learning_rate: float
    momentum: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    total_steps: int
    sparse: bool = False


def _check(condition: bool, message: str) -> None:
    """Raise an `AgmcError` with `message` unless `condition` holds."""
    if not condition:
        raise AgmcError(message)


def _frozen(value):
    """`value` with lists turned into tuples, so module attributes read back from JSON are hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return {key: _frozen(item) for key, item in value.items()}
    return value


def resolve_config(config: TrainConfig) -> TrainConfig:
    """`config` validated, with the input shape and number of classes filled in from the dataset spec."""
    spec = data.dataset_spec(config.dataset)
    _check(config.schedule in SCHEDULES, f"unknown schedule {config.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    _check(config.epochs >= 1, f"epochs must be at least 1, got {config.epochs}")
    _check(config.batch_size >= 1, f"batch_size must be at least 1, got {config.batch_size}")
    _check(bool(np.isfinite(config.learning_rate)) and config.learning_rate > 0,
           f"the learning rate (--lr) must be a positive finite number, got {config.learning_rate}")
    _check(bool(np.isfinite(config.weight_decay)) and config.weight_decay >= 0,
           f"weight_decay must be a finite number at least 0, got {config.weight_decay}")
    _check(bool(np.isfinite(config.momentum)) and 0 <= config.momentum < 1,
           f"momentum must be in [0, 1), got {config.momentum}")
    _check(0 <= config.warmup_epochs < config.epochs, "warmup_epochs must be at least 0 and less than epochs")
    _check(config.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    _check(min(config.eval_every, config.checkpoint_every, config.keep) >= 1,
           "eval_every, checkpoint_every and keep must be at least 1")
    _check(isinstance(config.checkpoint_steps, int) and config.checkpoint_steps >= 0,
           f"checkpoint_steps must be an integer at least 0, got {config.checkpoint_steps!r}")
    if config.data_workers is not None:
        data.check_workers(config.data_workers)
    _check(config.num_classes is None or config.num_classes >= spec.num_classes,
           f"--classes {config.num_classes} is below the {spec.num_classes} classes of {config.dataset}: its labels "
           f"would fall outside the network's outputs (the loss is NaN); give --classes {spec.num_classes} or more")
    return dataclasses.replace(config, input_shape=check_input_shape(config.model, config.input_shape or spec.input_shape),
                               num_classes=config.num_classes or spec.num_classes,
                               model_kwargs=_frozen(dict(config.model_kwargs)))


def config_to_dict(config: TrainConfig) -> dict:
    """The JSON form of `config` (tuples become lists), as written to `config.json`."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _takes(annotation, value) -> bool:
    """Whether a JSON `value` fits a field annotated `annotation` (an int is a float, a list a tuple; a bool is no
    number)."""
    kinds = typing.get_args(annotation) or (annotation,)
    if isinstance(value, bool):
        return bool in kinds
    return any(isinstance(value, {float: (int, float), tuple: (list, tuple)}.get(kind, kind)) for kind in kinds)


def _field_error(values: Mapping, source: str) -> str | None:
    """What is wrong with the first field of `values` whose value does not fit its `TrainConfig` field (None: none)."""
    for field in (f for f in dataclasses.fields(TrainConfig) if f.name in values):
        value = values[field.name]
        fits = _takes(field.type, value)
        if fits and field.name == "input_shape" and value is not None:
            fits = len(value) == 3 and all(_takes(int, size) and size > 0 for size in value)
        if not fits:
            expected = "[H, W, C]" if field.name == "input_shape" else getattr(field.type, "__name__", str(field.type))
            return f"{source}: field {field.name} is {json.dumps(value)}, not {expected.replace('None', 'null')}"
    return None


def config_from_dict(values: Mapping, source: str = "config") -> TrainConfig:
    """A `TrainConfig` from its JSON form; unknown or missing fields, a field of the wrong type and model_kwargs the
    model does not take are a `CheckpointError` naming `source` and the field (a hand-edited config.json)."""
    if not isinstance(values, Mapping):
        raise CheckpointError(f"{source} is not a JSON object: it was not written by agmc_jax.train")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CheckpointError(f"{source} has unknown fields {', '.join(unknown)}: it was written by another version")
    try:
        config = TrainConfig(**values)
    except TypeError as error:
        raise CheckpointError(f"{source} is incomplete ({error}): it was not written by agmc_jax.train") from error
    wrong = _field_error(values, source)
    if wrong:
        raise CheckpointError(f"{wrong}; restore the file agmc wrote or train again")
    try:
        create_model(config.model, config.num_classes, **config.model_kwargs)
    except TypeError as error:
        raise CheckpointError(f"{source}: field model_kwargs {config.model_kwargs} does not fit model {config.model} "
                              f"({error}); restore the file agmc wrote or train again") from None
    return dataclasses.replace(config, input_shape=_frozen(config.input_shape),
                               model_kwargs=_frozen(dict(config.model_kwargs)))


def build_module(config: TrainConfig):
    """The Linen module that `config` trains."""
    return create_model(config.model, config.num_classes, **config.model_kwargs)


def optimizer_spec(config: TrainConfig, steps_per_epoch: int) -> OptimizerSpec:
    """The optimizer hyperparameters of `config` for epochs of `steps_per_epoch` steps."""
    return OptimizerSpec(config.learning_rate, config.momentum, config.weight_decay, config.schedule,
                         config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch, config.sparse)


def learning_rate_schedule(spec: OptimizerSpec) -> optax.Schedule:
    """The learning rate as a function of the optimizer step: warmup + cosine decay to 0, one-cycle, or constant."""
    if spec.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(spec.total_steps, spec.learning_rate)
    if spec.schedule == "constant":
        return optax.constant_schedule(spec.learning_rate)
    return optax.warmup_cosine_decay_schedule(0.0, spec.learning_rate, spec.warmup_steps, spec.total_steps)


def make_optimizer(spec: OptimizerSpec) -> optax.GradientTransformation:
    """SGD with momentum on the schedule, plus coupled L2 weight decay on kernels (arrays of rank > 1).

    `sparse`: updates of kernel weights that are exactly zero are dropped, so pruned weights stay pruned.
    """
    kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    sgd = optax.chain(optax.add_decayed_weights(spec.weight_decay, mask=kernels),
                      optax.sgd(learning_rate_schedule(spec), momentum=spec.momentum))
    if not spec.sparse:
        return sgd
    keep_zeros = optax.stateless(lambda updates, params: jax.tree.map(
        lambda u, p: jnp.where(p == 0, 0, u) if p.ndim > 1 else u, updates, params))
    return optax.chain(sgd, keep_zeros)


def create_train_state(module, input_shape, config: TrainConfig) -> TrainState:
    """A fresh train state: variables initialised from `config.seed`, optimizer state, step 0.

    The optimizer state's structure and initial values do not depend on the schedule's length.
    """
    return state_from_variables(init_model(module, input_shape, config.seed), config)


def _variables(state: TrainState) -> dict:
    """The Linen variables of a train state."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def _sums(logits, labels, mask):
    """Summed cross-entropy, correct predictions and example count, so that batches of any size average exactly."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask.astype(jnp.int32)),
            "count": jnp.sum(mask.astype(jnp.int32))}


DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes; parameters, optimizer and BatchNorm stay float32


def compute_dtype(tree, dtype: str):
    """`tree`'s floating arrays in the compute dtype (unchanged for float32): Flax layers then compute in it."""
    if dtype == "float32":
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _plain_module(module, carry):
    return module


def _plain_params(params, carry):
    return params


class Hook(NamedTuple):
    """What a training phase adds to the plain step, from a `carry` the phase keeps on the devices: `module(module,
    carry)` is the network the step trains (ADMM's penalty wrapper; QAT's quantizing wrapper is passed as the module
    itself) and `params(params, carry)` the parameters after each update (a mask keeps pruned weights at zero)."""

    module: Callable = _plain_module
    params: Callable = _plain_params


PLAIN = Hook()


def masked_params(params, masks):
    """`params` times `masks` (a params-shaped tree of 0/1): the `Hook.params` of a phase whose carry is its masks."""
    return jax.tree.map(lambda p, m: p * m, params, masks)


def train_step(module, optimizer: OptimizerSpec, state: TrainState, batch, dtype: str = "float32",
               hook: Hook = PLAIN, carry=None) -> tuple[TrainState, dict]:
    """One SGD step on a batch of images and integer labels; returns the new state and metric sums.

    The loss is the mean cross-entropy plus every term the module sows into the `LOSSES` collection. In half
    precision (`dtype`, as Flax's `half_precision`) the forward and backward passes run in it on a cast of the
    float32 parameters; the loss, the gradients' update and BatchNorm statistics stay float32. `hook` and
    `carry` make it a masked, penalised or otherwise wrapped step (see `Hook`)."""
    network = hook.module(module, carry)

    def loss_fn(params):
        logits, updates = network.apply({"params": compute_dtype(params, dtype), "batch_stats": state.batch_stats},
                                        compute_dtype(batch["image"], dtype), train=True,
                                        mutable=["batch_stats", LOSSES])
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        extra = sum(jnp.sum(term.astype(jnp.float32)) for term in jax.tree.leaves(updates.get(LOSSES, {})))
        return loss + extra, (logits, updates.get("batch_stats", state.batch_stats))

    (_, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(optimizer).update(grads, state.opt_state, state.params)
    params = hook.params(optax.apply_updates(state.params, updates), carry)
    state = TrainState(state.step + 1, params, batch_stats, opt_state)
    return state, _sums(logits, batch["label"], jnp.ones(batch["label"].shape, jnp.float32))


def eval_step(module, variables, batch, dtype: str = "float32") -> dict:
    """Metric sums of the network in inference mode over the examples where `batch['mask']` is 1 (computed in
    `dtype`, the loss in float32)."""
    compute = compute_dtype(variables, dtype)  # BatchNorm's float32 statistics too, else they promote back to float32
    logits = module.apply(compute, compute_dtype(batch["image"], dtype), train=False).astype(jnp.float32)
    return _sums(logits, batch["label"], batch["mask"])


def data_mesh() -> Mesh:
    """A one-axis mesh ('data') over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def make_train_step(mesh: Mesh, module, optimizer: OptimizerSpec, dtype: str = "float32", hook: Hook = PLAIN):
    """`train_step(state, batch, carry=None)` compiled for a replicated state and carry and a batch split over the
    mesh; donates the state."""
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = jax.jit(lambda state, batch, carry: train_step(module, optimizer, state, batch, dtype, hook, carry),
                   in_shardings=(replicated, split, replicated), out_shardings=(replicated, replicated),
                   donate_argnums=0)
    return lambda state, batch, carry=None: step(state, batch, carry)


def make_eval_step(mesh: Mesh, module, dtype: str = "float32"):
    """`eval_step(variables, batch)` compiled for replicated variables and a batch split over the mesh."""
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return partial(jax.jit(partial(eval_step, dtype=dtype), static_argnums=0, in_shardings=(replicated, split),
                           out_shardings=replicated), module)


def global_batch(batch: Mapping, mesh: Mesh) -> dict:
    """This process's slice of a batch as global arrays split over the mesh's 'data' axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}


def _padded(batch: Mapping, size: int) -> dict:
    """`batch` padded with zeros to `size` examples, with a 'mask' that is 1 on the real ones."""
    count = len(batch["label"])
    padded = {key: np.concatenate([value, np.zeros((size - count, *value.shape[1:]), value.dtype)])
              for key, value in batch.items()}
    return {**padded, "mask": (np.arange(size) < count).astype(np.float32)}


def _check_batch_size(batch_size: int) -> int:
    """This process's share of a global batch, which must split evenly over processes and devices."""
    _check(batch_size % jax.device_count() == 0,
           f"batch size {batch_size} must be a multiple of the number of devices ({jax.device_count()})")
    return batch_size // jax.process_count()


def _check_shape(batch: Mapping, input_shape) -> None:
    """Raise `InputShapeError` when the data's images do not have the network's input shape."""
    if tuple(batch["image"].shape[1:]) != tuple(input_shape):
        raise InputShapeError(f"the data's images are {tuple(batch['image'].shape[1:])} but the network was "
                              f"configured for {tuple(input_shape)}; set input_shape to match")


def _check_input_shape(config: TrainConfig, source) -> None:
    """Raise `InputShapeError` when the training images (as the pipeline delivers them: resized to the dataset's shape
    for ImageNet, else as stored) do not have the network's input shape: said before anything is written, not at the
    first batch."""
    spec = data.dataset_spec(config.dataset)
    shape = tuple(spec.input_shape) if spec.augment == "imagenet" or not len(source) else \
        tuple(np.shape(source.get(np.arange(1))[0][0]))
    if tuple(config.input_shape) != shape:
        raise InputShapeError(f"the network's input shape {tuple(config.input_shape)} is not that of the training "
                              f"images {shape}; leave --input out (or give {','.join(map(str, shape))})")


def data_workers(config: TrainConfig) -> int:
    """The input worker processes of `config`: its own number, else the dataset's default."""
    return data.default_workers(data.dataset_spec(config.dataset)) if config.data_workers is None \
        else config.data_workers


def _batches(source, config: TrainConfig, batch_size: int, train: bool, epochs: int = 1) -> data.BatchIterator:
    """This process's batches of `source` for `epochs` epochs from the first, in an order fixed by (seed, epoch)."""
    return data.batches(source, config.dataset, batch_size, train=train, seed=config.seed, epochs=epochs,
                        drop_remainder=train, process_index=jax.process_index(),
                        process_count=jax.process_count(), workers=data_workers(config))


def _total(metrics: list) -> dict:
    """The sum of a list of metric-sum dicts, on the host in float64."""
    values = jax.device_get(metrics)
    return {key: float(sum(np.float64(m[key]) for m in values)) for key in ("loss", "correct", "count")}


def _rates(total: Mapping) -> dict:
    """Mean loss and accuracy from metric sums."""
    count = max(total["count"], 1.0)
    return {"loss": total["loss"] / count, "accuracy": total["correct"] / count, "count": int(total["count"])}


def metric_rates(metrics: list) -> dict:
    """Mean loss, accuracy and count of a list of device metric sums."""
    return _rates(_total(metrics))


def evaluate_batches(variables, step_fn, batches: Iterable, mesh: Mesh, size: int) -> dict:
    """Loss, accuracy and count over this process's `batches` (each padded to `size` examples and masked): the one
    evaluator of training, fine-tuning, the stages and AutoCompress."""
    return metric_rates([step_fn(variables, global_batch(_padded(batch, size), mesh)) for batch in batches])


def _checked(batches: Iterable, input_shape) -> Iterable:
    """`batches`, each checked to have the network's input shape."""
    for batch in batches:
        _check_shape(batch, input_shape)
        yield batch


def evaluate_source(variables, step_fn, source, config: TrainConfig, mesh: Mesh, batch_size: int) -> dict:
    """Loss, accuracy and count of the network on all of `source` (the last batch padded and masked)."""
    local = _check_batch_size(batch_size)
    with _batches(source, config, batch_size, train=False) as batches:
        return evaluate_batches(variables, step_fn, _checked(batches, config.input_shape), mesh, local)


def array_batches(images, labels, batch_size: int) -> Iterable:
    """This process's share of labelled arrays (the same on every process) in batches of `batch_size` examples
    globally, in order: what `evaluate_batches` reads for in-memory data."""
    share = _check_batch_size(batch_size)
    first = jax.process_index() * share
    for start in range(0, len(labels), batch_size):
        yield {"image": np.asarray(images[start + first:start + first + share], np.float32),
               "label": np.asarray(labels[start + first:start + first + share], np.int32)}


def evaluate_arrays(module, variables, images, labels, batch_size: int = 512, mesh: Mesh | None = None) -> dict:
    """Loss, accuracy and count of (module, variables) in inference mode on labelled arrays (the same on every
    process), by `evaluate_batches` over `mesh` (default: every device); `batch_size` rounds up to the devices."""
    mesh = data_mesh() if mesh is None else mesh
    size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    return evaluate_batches(place(variables, NamedSharding(mesh, P())), make_eval_step(mesh, module),
                            array_batches(images, labels, size), mesh, size // jax.process_count())


def train_steps(step_fn, state: TrainState, batches: Iterable, mesh: Mesh, carry=None, after=None):
    """The one training loop (training, fine-tuning, QAT, masked retraining, ADMM): one compiled step per batch of
    this process's `batches`, split over `mesh`; then `after(state, metrics, carry)` on the host returns the next
    step's carry (progress, checkpoints, ADMM's Z/U updates). Returns (state, carry)."""
    for batch in batches:
        if len(batch["label"]) * jax.process_count() % mesh.devices.size:
            raise AgmcError(f"a batch of {len(batch['label']) * jax.process_count()} examples does not split over "
                            f"{mesh.devices.size} devices; choose a batch size that is a multiple of it")
        state, metrics = step_fn(state, global_batch(batch, mesh), carry)
        carry = carry if after is None else after(state, metrics, carry)
    return state, carry


ZERO = {"loss": 0.0, "correct": 0.0, "count": 0.0}  # metric sums before the first step


def _add(totals: Mapping, metrics: list) -> dict:
    """`totals` plus the sums of `metrics` (device metric sums)."""
    more = _total(metrics)
    return {key: totals[key] + more[key] for key in ZERO}


def _train_epoch(state, run: "_Run", feed: data.BatchIterator, epoch: int, totals: Mapping, save):
    """The rest of epoch `epoch` from `feed`'s position; returns the new state and the epoch's metric sums.

    `totals` are the sums of the epoch's steps before that position (a run resumed mid-epoch). Every
    `checkpoint_steps` steps `save(state, epoch, {'totals': sums so far})` checkpoints mid-epoch; the sums are
    folded in there (an uninterrupted run folds them at the same steps as a resumed one: equal to the bit)."""
    config, metrics = run.config, []
    done = feed.get_state()["next_index"] - epoch * run.steps
    hidden = jax.process_index() != 0 or not sys.stderr.isatty()
    with tqdm(total=run.steps, initial=done, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
              disable=hidden) as bar:
        def after(state, step_metrics, carry):
            nonlocal totals, metrics
            metrics.append(step_metrics)
            bar.update()
            if len(metrics) % 10 == 0:
                rates = metric_rates(metrics[-10:])
                bar.set_postfix(loss=f"{rates['loss']:.3f}", acc=f"{rates['accuracy']:.3f}")
            position = feed.get_state()["next_index"]
            if config.checkpoint_steps and position % config.checkpoint_steps == 0 and position % run.steps:
                totals, metrics = _add(totals, metrics), []
                save(state, epoch, {"totals": totals})
            return carry

        state, _ = train_steps(run.train_fn, state, _checked(itertools.islice(feed, run.steps - done),
                                                             config.input_shape), run.mesh, after=after)
    return state, _add(totals, metrics)


def _read_json(path: Path) -> dict:
    """A JSON file of a workdir, or a `CheckpointError` saying which file is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} not found: not a training workdir (run training first)") from error
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); restore it or use another workdir") from error


SAME_RUN = "use a new workdir or the same config"  # how to fix a workdir of another run
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _check_same_run(saved: Mapping, current: Mapping, where, fix: str = SAME_RUN) -> None:
    """Raise a `CheckpointError` unless `saved` (read from `where`) describes the same run as `current`: every field
    but `RUN_FIELDS` equal (a missing one at its default)."""
    runs.refuse_foreign(saved, current, where, fix, defaults=_DEFAULTS,
                        ignored=RUN_FIELDS)


def check_workdir(workdir: Path, config: TrainConfig, fix: str = SAME_RUN) -> None:
    """Refuse a workdir that is a file, or whose config or checkpoints belong to a different run (`fix` says what to
    do); touches no file."""
    if workdir.exists() and not workdir.is_dir():
        raise CheckpointError(f"{workdir} is a file; choose a directory for --workdir")
    path = workdir / "config.json"
    if path.exists():
        _check_same_run(_read_json(path), config_to_dict(config), str(path), fix)
    elif checkpoint.latest_step(workdir / "checkpoints") is not None:
        raise CheckpointError(f"{workdir / 'checkpoints'} holds checkpoints but {path} is missing; use a new workdir")


def _run_metadata(directory: Path, step: int | None = None, meta: Mapping | None = None) -> dict:
    """The epoch and config saved with a training checkpoint (default: the latest), from `meta` when read already."""
    meta = checkpoint.metadata(directory, step) if meta is None else meta
    if not {"epoch", "config"} <= set(meta):
        where = directory / str(checkpoint.latest_step(directory) if step is None else step)
        raise CheckpointError(f"checkpoint {where} has no training metadata: it is corrupt or was not written by "
                              "agmc_jax.train; delete it or restore another step")
    return meta


def state_from_variables(variables, config: TrainConfig) -> TrainState:
    """A train state at step 0 that starts from given variables (e.g. a slimmed network's)."""
    opt_state = make_optimizer(optimizer_spec(config, 1)).init(variables["params"])
    return TrainState(jnp.zeros((), jnp.int32), variables["params"], variables.get("batch_stats", {}), opt_state)


def abstract_train_state(module, config: TrainConfig, sharding=None, variables=None) -> TrainState:
    """The shapes and dtypes of `config`'s train state (placed with `sharding`), computed without running anything."""
    shapes = jax.eval_shape(lambda: create_train_state(module, config.input_shape, config) if variables is None
                            else state_from_variables(variables, config))
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes)


def _init_digest(variables) -> str | None:
    """The hash of the variables a run starts from (None: the config's random initialisation)."""
    return None if variables is None else checkpoint.digest(variables)


def started_from(workdir) -> str | None:
    """The hash of the variables the run in `workdir` started from (None: none recorded or no checkpoint)."""
    directory = Path(workdir) / "checkpoints"
    try:
        return checkpoint.metadata(directory).get("init") if checkpoint.latest_step(directory) is not None else None
    except CheckpointError:
        return None


def _restore_or_init(workdir: Path, module, config: TrainConfig, mesh: Mesh, variables=None) -> tuple[TrainState, dict]:
    """The newest readable checkpoint's state and metadata when there is one (unreadable newer ones are passed
    over with a warning), else a fresh state (replicated) and {}."""
    directory, replicated = workdir / "checkpoints", NamedSharding(mesh, P())
    target = abstract_train_state(module, config, replicated, variables)

    def restore(step, meta):
        if meta.get("init") not in (None, _init_digest(variables)):
            raise CheckpointError(f"checkpoint {step} in {directory} continues a run started from other variables; "
                                  "use a new workdir to train these")
        return checkpoint.restore(directory, step, target=target)

    found = runs.resume(directory, config_to_dict(config), restore, SAME_RUN,
                        saved=lambda step, meta: _run_metadata(directory, step, meta)["config"],
                        defaults=_DEFAULTS, ignored=RUN_FIELDS)
    if found is None:
        fresh = (create_train_state(module, config.input_shape, config) if variables is None  # a copy: the
                 else state_from_variables(jax.tree.map(jnp.array, variables), config))  # steps donate the state
        return place(fresh, replicated), {}
    _, meta, state = found
    return state, meta


def _position(meta: Mapping, steps: int) -> tuple[int, dict, dict]:
    """(completed epochs, input iterator state, metric sums of the unfinished epoch) saved in a checkpoint's
    metadata ({}: a fresh run); checkpoints written at epoch ends before the iterator state was saved say the
    epoch only."""
    epoch = int(meta.get("epoch", 0))
    feed_state = meta.get("data", {"next_index": epoch * steps})
    if not epoch * steps <= feed_state["next_index"] < (epoch + 1) * steps:
        raise CheckpointError(f"the checkpoint stopped at batch {feed_state['next_index']} of a run of {steps} "
                              f"batches per epoch in epoch {epoch + 1}: the training data changed size; use a new "
                              "workdir")
    return epoch, feed_state, meta.get("totals", ZERO)


def _records(path: Path) -> list:
    """The records of metrics.jsonl ([] when there is none); a line cut short by a kill is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _trim_metrics(path: Path, epoch: int) -> None:
    """Drop lines for epochs after `epoch` (logged before the checkpoint of a run killed in between)."""
    if path.exists():
        checkpoint.write_text(path, "".join(json.dumps(r) + "\n" for r in _records(path) if r["epoch"] <= epoch))


def _log(workdir: Path, writer, record: Mapping) -> None:
    """Append an epoch's record to metrics.jsonl, TensorBoard and stdout (process 0 only)."""
    if writer is None:
        return
    with open(workdir / "metrics.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")
    for key, value in record.items():
        if key not in ("epoch", "step") and value is not None:
            writer.add_scalar(key, value, record["step"])
    writer.flush()
    shown = " ".join(f"{key} {value:.4g}" for key, value in record.items()
                     if key not in ("epoch", "step", "seconds") and value is not None)
    print(f"epoch {record['epoch']} step {record['step']} {shown} ({record['seconds']:.1f}s)", flush=True)


def _open_workdir(workdir: Path, config: TrainConfig, epoch: int):
    """On process 0: write config.json, drop metric lines after `epoch`, return a TensorBoard writer (else None)."""
    if jax.process_index() != 0:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text(workdir / "config.json", json.dumps(config_to_dict(config), indent=2) + "\n")
    _trim_metrics(workdir / "metrics.jsonl", epoch)
    return SummaryWriter(str(workdir / "tb"))


def _source(sources: Mapping | None, config: TrainConfig, split: str):
    """The injected source for `split`, else the dataset's split read from `config.data_dir`."""
    if sources is not None and split in sources:
        return sources[split]
    return data.load(config.dataset, split, config.data_dir)


class _Run(NamedTuple):
    """What every epoch of one `train` call shares."""

    config: TrainConfig
    mesh: Mesh
    steps: int  # per epoch
    last: int  # the epoch this call stops after
    train_fn: Any
    eval_fn: Any
    schedule: optax.Schedule
    train_source: Any
    validation: Any


def _epoch(run: _Run, state: TrainState, epoch: int, feed: data.BatchIterator, totals: Mapping, save
           ) -> tuple[TrainState, dict]:
    """Train epoch `epoch` (from 0) from `feed`'s position on, validate when due; returns the new state and the
    epoch's record."""
    began, done, config = time.perf_counter(), epoch + 1, run.config
    state, totals = _train_epoch(state, run, feed, epoch, totals, save)
    due = len(run.validation) and (done % config.eval_every == 0 or done == run.last)
    val = evaluate_source(_variables(state), run.eval_fn, run.validation, config, run.mesh, config.batch_size) \
        if due else {"loss": None, "accuracy": None}
    rates, step = _rates(totals), int(state.step)
    return state, {"epoch": done, "step": step, "train_loss": rates["loss"], "train_acc": rates["accuracy"],
                   "val_loss": val["loss"], "val_acc": val["accuracy"], "lr": float(run.schedule(step - 1)),
                   "seconds": time.perf_counter() - began}


def _last_record(workdir: Path) -> dict:
    """The last record of metrics.jsonl ({} when there is none): the record of a run that resumes complete."""
    records = _records(workdir / "metrics.jsonl")
    return records[-1] if records else {}


def _check_variables(module, config: TrainConfig, variables) -> None:
    """Refuse starting variables whose leaves or shapes differ from those `config`'s network initialises."""
    expected = jax.eval_shape(lambda: init_model(module, config.input_shape, config.seed))

    def shapes(tree):
        return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in
                jax.tree_util.tree_flatten_with_path({k: tree.get(k, {}) for k in ("params", "batch_stats")})[0]}

    want, have = shapes(expected), shapes(variables)
    if want != have:
        path = sorted(set(want) ^ set(have) or {p for p in want if want[p] != have[p]})[0]
        raise CheckpointError(f"the starting variables (--init-from) do not fit {config.model} with "
                              f"{config.num_classes} classes ({path}: {have.get(path, 'missing')} where the network "
                              f"has {want.get(path, 'nothing')}); start from a workdir of the same model")


def train(config: TrainConfig, workdir, sources: Mapping | None = None, stop_after: int | None = None,
          module=None, variables=None) -> dict:
    """Train (or resume) the run `config` in `workdir`; returns the last epoch's metrics, plus test metrics at the end.

    `sources` maps 'train'/'validation'/'test' to data sources that replace the dataset's splits.
    `stop_after` ends this call after that many epochs in total (the schedule still spans `config.epochs`).
    `module` and `variables` replace the zoo module and its random initialisation (fine-tuning).
    """
    config, workdir = resolve_config(config), Path(workdir)
    check_workdir(workdir, config)
    _check_batch_size(config.batch_size)
    train_source = _source(sources, config, "train")
    _check_input_shape(config, train_source)
    steps = data.steps_per_epoch(train_source, config.batch_size)
    _check(steps >= 1, f"batch size {config.batch_size} exceeds the {len(train_source)} training examples")
    mesh, optimizer = data_mesh(), optimizer_spec(config, steps)
    if module is None and variables is not None:
        _check_variables(build_module(config), config, variables)
    module = build_module(config) if module is None else module
    run = _Run(config, mesh, steps, config.epochs if stop_after is None else min(stop_after, config.epochs),
               make_train_step(mesh, module, optimizer, config.dtype), make_eval_step(mesh, module, config.dtype),
               learning_rate_schedule(optimizer), train_source, _source(sources, config, "validation"))
    with checkpoint.locked(workdir):
        return _train(run, workdir, module, config, mesh, variables, sources)


def _train(run, workdir, module, config, mesh, variables, sources) -> dict:
    """`train` once its inputs are checked and its workdir locked."""
    state, meta = _restore_or_init(workdir, module, config, mesh, variables)
    start, position, totals = _position(meta, run.steps)
    init = _init_digest(variables)
    writer = _open_workdir(workdir, config, start)
    record = _last_record(workdir)
    feed = _batches(run.train_source, config, config.batch_size, train=True, epochs=config.epochs)
    feed.set_state(position)

    def save(state, epoch: int, more: Mapping) -> None:
        """Checkpoint `state` after `epoch` complete epochs, with the input iterator's state and `more`."""
        checkpoint.save(workdir / "checkpoints", int(state.step), state,
                        {"epoch": epoch, "data": feed.get_state(), **more, "config": config_to_dict(config),
                         **({"init": init} if init is not None else {})}, keep=config.keep)

    try:
        with feed:
            for epoch in range(start, run.last):
                state, record = _epoch(run, state, epoch, feed, totals, save)
                totals = ZERO
                _log(workdir, writer, record)  # before the checkpoint: a resume drops the lines after its epoch
                if record["epoch"] % config.checkpoint_every == 0 or record["epoch"] == run.last:
                    save(state, record["epoch"], {})
        if run.last < config.epochs:
            return record
        test = evaluate_source(_variables(state), run.eval_fn, _source(sources, config, "test"), config, mesh,
                               config.batch_size)
        summary = {**record, "test_loss": test["loss"], "test_acc": test["accuracy"], "test_count": test["count"]}
        if writer is not None:
            writer.add_scalar("test_acc", test["accuracy"], int(state.step))
            checkpoint.write_text(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        if writer is not None:
            writer.close()


def load_trained(workdir, step: int | None = None) -> tuple[Any, dict, dict]:
    """The module, variables ('params', 'batch_stats') and config dict of a trained workdir's checkpoint."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise CheckpointError(f"workdir {workdir} {'is a file' if workdir.exists() else 'does not exist'}: give a "
                              "training workdir (train first) or fix the path")
    values = _read_json(workdir / "config.json")
    config = config_from_dict(values, str(workdir / "config.json"))
    module, directory = build_module(config), workdir / "checkpoints"
    where = f"checkpoint {'latest' if step is None else step} in {directory}"
    _check_same_run(_run_metadata(directory, step)["config"], values, where)
    state = checkpoint.restore(directory, step, abstract_train_state(module, config))
    return module, _variables(state), values


def evaluate(workdir, split: str = "test", data_dir: str | None = None, batch_size: int = 256,
             step: int | None = None, source=None) -> dict:
    """Loss, accuracy and count of a trained workdir's network on a dataset split (or an injected source)."""
    module, variables, values = load_trained(workdir, step)
    config = config_from_dict(values)
    source = source if source is not None else data.load(config.dataset, split, data_dir or config.data_dir)
    mesh = data_mesh()
    variables = place(variables, NamedSharding(mesh, P()))
    return evaluate_source(variables, make_eval_step(mesh, module, config.dtype), source, config, mesh, batch_size)
