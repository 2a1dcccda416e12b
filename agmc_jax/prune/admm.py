"""ADMM structured pruning (AutoCompress's core): training pulls the kernels towards a structured-sparsity set.

Minimise loss(W) + sum_i rho_i / 2 ||W_i - Z_i + U_i||^2 over the kernels W_i of every convolution and
dense layer; every `interval` steps Z = the Euclidean projection of W + U onto the set, U += W - Z
and rho grows by `rho_growth` up to `rho_max`. The sets, for a `Target`:

* filters: group g keeps `filters[g]` channels. A channel's norm sums over every layer that produces
  it (residual additions and depthwise convolutions tie several), so a traced group is projected as
  one: keep the channels of largest norm, zero the others' filters (exactly the projection).
* columns: layer l keeps `columns[l]` of its columns (the (kh, kw, c_in) positions, each a vector over
  the output channels): keep the columns of largest norm (exactly the projection).
* both: filters, then columns of what is left (a heuristic: the exact projection onto the
  intersection is a maximum-weight submatrix problem).

The penalty reaches `train.train_step` through the "losses" collection (`Penalized`), so an ADMM step
is the one train step with a `train.Hook` that wraps the module and masks the parameters, run by the one
loop `train.train_steps`; `admm_train` and `masked_train` are the two phases.
"""
import itertools
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from agmc_jax.errors import AdmmError
from agmc_jax.hosts import place
from agmc_jax.prune.masks import masks_from_vectors
from agmc_jax.train import (LOSSES, PLAIN, Hook, OptimizerSpec, TrainState, data_mesh, make_optimizer,
                            make_train_step, masked_params, metric_rates, train_steps)


class Target(NamedTuple):
    """The structure ADMM projects onto; None leaves that structure unconstrained."""

    filters: Any = None  # int[G]: channels kept per channel group
    columns: Any = None  # int[L]: columns kept per layer (in `net.layers` order)


class AdmmConfig(NamedTuple):
    """The penalty's schedule: rho x1.3 per update as in AutoCompress. rho is relative to the batch-mean loss;
    measured on LeNet-5 / Fashion-MNIST (one epoch, lr 0.01), rho 0.01 left the hard-pruned network at 0.60
    top-1, 0.05 at 0.73, 0.2 at 0.85 (one-shot magnitude pruning: 0.58, dense 0.89)."""

    rho: float = 0.1  # initial penalty weight
    rho_growth: float = 1.3  # factor per Z/U update
    rho_max: float = 1.0  # cap (SGD stays stable while learning_rate * rho / (1 - momentum) is well below 1)
    interval: int = 200  # training steps between Z/U updates


def check_admm_config(config: AdmmConfig) -> None:
    """Raise `AdmmError` on a schedule that cannot run."""
    if not config.rho > 0:
        raise AdmmError(f"ADMM rho must be positive, got {config.rho}")
    if not config.rho_growth > 0:
        raise AdmmError(f"ADMM rho_growth must be positive (1.3 in the paper), got {config.rho_growth}")
    if not config.rho_max >= config.rho:
        raise AdmmError(f"ADMM rho_max must be at least rho ({config.rho}), got {config.rho_max}")
    if config.interval < 1:
        raise AdmmError(f"ADMM interval (steps between Z/U updates) must be positive, got {config.interval}")


class AdmmState(NamedTuple):
    """The auxiliary variable Z, the scaled dual U (per kernel, in layer order) and rho per layer."""

    z: tuple
    u: tuple
    rho: jax.Array


def _descending_ranks(scores, axis=-1):
    """Each entry's rank by score along `axis`, largest first, ties broken by position (traceable)."""
    return jnp.argsort(jnp.argsort(-scores, axis=axis, stable=True), axis=axis, stable=True)


class Sparsity:
    """A traced network's structured-sparsity sets: pure, jittable projections of its kernels.

    Per-group and per-layer counts are arrays, so one compiled projection serves every target.
    """

    def __init__(self, net):
        self.net = net
        ops = net.analysis.layers
        self.leaves = tuple(op.leaf for op in ops)
        self.out_axes = tuple(op.out_axis for op in ops)
        self.paths = tuple(net.paths[leaf] for leaf in self.leaves)
        sizes = np.array(net.group_sizes, np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.units = int(offsets[-1])
        # flat unit id of each output index of each layer (-1: not prunable)
        self.out_units = tuple(np.where(m.group >= 0, offsets[np.maximum(m.group, 0)] + m.unit, -1).astype(np.int32)
                               for m in (net.axis_maps[op.leaf][op.out_axis] for op in ops))
        width = int(sizes.max()) if len(sizes) else 0
        grid = np.full((len(sizes), width), self.units, np.int32)  # units as a padded [G, max size] grid
        for g, size in enumerate(sizes):
            grid[g, :size] = offsets[g] + np.arange(size)
        self.grid = grid
        self.unit_group = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
        self.unit_index = np.concatenate([np.arange(s) for s in sizes] + [np.zeros(0)]).astype(np.int32)
        self.columns = np.array([int(np.prod(net.shapes[leaf])) // net.shapes[leaf][axis]
                                 for leaf, axis in zip(self.leaves, self.out_axes)], np.int64)
        self.sizes = sizes

    # ----- kernels in and out of a params tree -----------------------------------------------
    def kernels(self, params) -> tuple:
        """The constrained kernels of a `params` tree, in layer order."""
        out = []
        for path in self.paths:
            node = params
            for key in path[1:]:
                node = node[key]
            out.append(node)
        return tuple(out)

    def replace(self, params, kernels):
        """`params` with its constrained kernels replaced (a new tree; pure)."""
        replaced = {path[1:]: k for path, k in zip(self.paths, kernels)}
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [tuple(getattr(k, "key", k) for k in p) for p, _ in flat]
        return jax.tree.unflatten(treedef, [replaced.get(n, leaf) for n, (_, leaf) in zip(names, flat)])

    # ----- targets ----------------------------------------------------------------------------
    def check_target(self, target: Target) -> Target:
        """The target as int32 arrays, after checking its counts against the network (host)."""
        if target.filters is None and target.columns is None:
            raise AdmmError("an ADMM target needs filters per group, columns per layer, or both")
        filters = columns = None
        if target.filters is not None:
            filters = self._counts(target.filters, self.sizes, "filters", "channel group")
        if target.columns is not None:
            columns = self._counts(target.columns, self.columns, "columns", "layer")
        return Target(filters, columns)

    @staticmethod
    def _counts(counts, sizes, what, unit):
        counts = np.asarray(counts)
        if counts.shape != sizes.shape:
            raise AdmmError(f"{what} needs one count per {unit} ({len(sizes)}), got shape {counts.shape}")
        if (counts < 1).any() or (counts > sizes).any():
            worst = int(np.argmax((counts < 1) | (counts > sizes)))
            raise AdmmError(f"{what}[{worst}] = {int(counts[worst])} is outside 1..{int(sizes[worst])}: "
                            f"every {unit} keeps at least one and at most all")
        return jnp.asarray(counts, jnp.int32)

    # ----- projections (pure) ----------------------------------------------------------------
    def unit_keep(self, kernels, filters):
        """Per flat channel unit: kept (True) when among its group's `filters[g]` of largest L2 norm."""
        scores = jnp.zeros(self.units + 1, jnp.float32)
        for kernel, axis, units in zip(kernels, self.out_axes, self.out_units):
            per_out = jnp.sum(jnp.square(jnp.moveaxis(kernel, axis, 0)).reshape(kernel.shape[axis], -1), axis=1)
            scores = scores.at[jnp.where(units >= 0, units, self.units)].add(per_out)
        padded = jnp.where(jnp.asarray(self.grid) < self.units, scores[self.grid], -jnp.inf)
        kept = _descending_ranks(padded) < jnp.asarray(filters)[:, None]
        return kept[self.unit_group, self.unit_index]

    def _filter_project(self, kernels, filters):
        keep = jnp.concatenate([self.unit_keep(kernels, filters), jnp.ones(1, bool)])
        out = []
        for kernel, axis, units in zip(kernels, self.out_axes, self.out_units):
            view = [1] * kernel.ndim
            view[axis] = kernel.shape[axis]
            out.append(kernel * keep[jnp.where(units >= 0, units, self.units)].reshape(view).astype(kernel.dtype))
        return tuple(out)

    def column_keep(self, kernels, columns) -> tuple:
        """Per layer: the 0/1 mask of its `columns[l]` columns of largest L2 norm, shaped like the kernel."""
        out = []
        for l, (kernel, axis) in enumerate(zip(kernels, self.out_axes)):
            norms = jnp.sum(jnp.square(kernel), axis=axis)
            keep = (_descending_ranks(norms.ravel()) < jnp.asarray(columns)[l]).reshape(norms.shape)
            out.append(jnp.expand_dims(keep, axis).astype(kernel.dtype))
        return tuple(out)

    def project(self, kernels, target: Target) -> tuple:
        """The Euclidean projection of `kernels` onto the target's set (filters then columns for both)."""
        if target.filters is not None:
            kernels = self._filter_project(kernels, target.filters)
        if target.columns is not None:
            kernels = tuple(k * m for k, m in zip(kernels, self.column_keep(kernels, target.columns)))
        return kernels

    def distance(self, kernels, target: Target):
        """||W - proj(W)||^2 / ||W||^2 over the constrained kernels: 0 on the set."""
        projected = self.project(kernels, target)
        gap = sum(jnp.sum(jnp.square(k - p)) for k, p in zip(kernels, projected))
        return gap / jnp.maximum(sum(jnp.sum(jnp.square(k)) for k in kernels), 1e-30)

    # ----- hard masks (host) -----------------------------------------------------------------
    def masks(self, variables, target: Target):
        """The 0/1 mask pytree of the projection of `variables`' kernels: a removed channel goes from every
        leaf that carries it (filters, the next layers' inputs, BatchNorm, biases); columns mask kernels."""
        target = self.check_target(target)
        kernels = self.kernels(variables["params"])
        if target.filters is not None:
            keep = np.asarray(jax.jit(self.unit_keep)(kernels, target.filters))
            vectors = [keep[self.grid[g, :s]] for g, s in enumerate(self.sizes)]
            masks = masks_from_vectors(self.net, vectors)
        else:
            masks = jax.tree.map(np.ones_like, variables)
        if target.columns is None:
            return masks
        columns = jax.jit(lambda kernels, target: self.column_keep(self.project(kernels, target._replace(
            columns=None)) if target.filters is not None else kernels, target.columns))(kernels, target)
        params = self.replace(masks["params"], [np.asarray(m) * np.asarray(c) for m, c in
                                                zip(self.kernels(masks["params"]), columns)])
        return {**masks, "params": params}


# ----- the ADMM variables --------------------------------------------------------------------
def admm_init(sparsity: Sparsity, params, target: Target, config: AdmmConfig = AdmmConfig()) -> AdmmState:
    """Z = proj(W), U = 0, rho at its initial value (pure)."""
    kernels = sparsity.kernels(params)
    return AdmmState(sparsity.project(kernels, target), tuple(jnp.zeros_like(k) for k in kernels),
                     jnp.full(len(kernels), config.rho, jnp.float32))


def admm_update(sparsity: Sparsity, state: AdmmState, params, target: Target,
                config: AdmmConfig = AdmmConfig()) -> AdmmState:
    """Z = proj(W + U), U += W - Z, rho *= growth up to the cap (pure)."""
    kernels = sparsity.kernels(params)
    z = sparsity.project(tuple(w + u for w, u in zip(kernels, state.u)), target)
    u = tuple(u + w - zi for u, w, zi in zip(state.u, kernels, z))
    return AdmmState(z, u, jnp.minimum(state.rho * config.rho_growth, config.rho_max))


def admm_penalty(sparsity: Sparsity, state: AdmmState, params):
    """sum_i rho_i / 2 ||W_i - Z_i + U_i||^2 (pure, differentiable in `params`)."""
    kernels = sparsity.kernels(params)
    return sum(r / 2 * jnp.sum(jnp.square(w - z + u))
               for r, w, z, u in zip(state.rho, kernels, state.z, state.u))


class Penalized(nn.Module):
    """`network` (same variables) that sows `penalty(params)` into the "losses" collection `train_step` adds."""

    network: Any
    penalty: Callable

    def setup(self):
        nn.share_scope(self, self.network)

    def __call__(self, *args, **kwargs):
        outputs = self.network(*args, **kwargs)
        self.sow(LOSSES, "admm", self.penalty(self.variables["params"]))
        return outputs


# ----- training phases -----------------------------------------------------------------------
class Feed(NamedTuple):
    """Training data: `batches(epoch)` yields dicts of 'image' and 'label' arrays, `steps` of them per epoch."""

    batches: Callable[[int], Iterable[Mapping]]
    steps: int


def array_feed(images, labels, batch_size: int = 128, seed: int = 0) -> Feed:
    """A `Feed` over in-memory arrays: shuffled per epoch from `seed`, the last partial batch dropped."""
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    steps = len(labels) // batch_size
    if steps < 1:
        raise AdmmError(f"batch size {batch_size} exceeds the {len(labels)} training examples")

    def batches(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(len(labels))
        for step in range(steps):
            chosen = order[step * batch_size:(step + 1) * batch_size]
            yield {"image": images[chosen], "label": labels[chosen]}

    return Feed(batches, steps)


class FitConfig(NamedTuple):
    """A training phase: SGD with momentum on a cosine schedule, coupled L2 decay on kernels (as train.py)."""

    epochs: int = 1
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4


def _optimizer(fit: FitConfig, steps: int) -> OptimizerSpec:
    return OptimizerSpec(fit.learning_rate, fit.momentum, fit.weight_decay, "cosine", 0, max(1, fit.epochs * steps))


def _train(module, variables, masks, feed: Feed, fit: FitConfig, hook: Hook = PLAIN, carry=None, on_step=None,
           mesh=None):
    """Train `variables` for `fit.epochs` with `train.train_steps`, params times `masks` after every step (pruned
    stays pruned): the step's `hook` sees the carry {'masks': ..., 'phase': carry}.

    Each batch is split over `mesh`'s 'data' axis (default: every device), the state replicated, as in
    `train.train`. Every step `on_step(step, params, carry)` may return a new phase carry (host). Returns
    (variables, carry, the last epoch's mean loss and accuracy).
    """
    if fit.epochs < 1:
        raise AdmmError(f"training phases need at least one epoch, got {fit.epochs}")
    mesh = data_mesh() if mesh is None else mesh
    spec, replicated = _optimizer(fit, feed.steps), NamedSharding(mesh, P())
    params = masked_params(variables["params"], masks["params"])
    state = place(TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}),
                             make_optimizer(spec).init(params)), replicated)  # new arrays: the steps donate them
    step = make_train_step(mesh, module, spec, hook=hook._replace(
        params=lambda params, both: masked_params(params, both["masks"])))
    both = place({"masks": masks["params"], "phase": carry}, replicated)
    metrics, done = [], itertools.count(1)

    def after(state, sums, both):
        metrics.append(sums)
        step = next(done)
        return both if on_step is None else {**both, "phase": on_step(step, state.params, both["phase"])}

    for epoch in range(fit.epochs):
        metrics.clear()
        state, both = train_steps(step, state, feed.batches(epoch), mesh, both, after)
    rates = metric_rates(metrics)
    variables = {**variables, "params": state.params,
                 **({"batch_stats": state.batch_stats} if "batch_stats" in variables else {})}
    return variables, both["phase"], {"loss": rates["loss"], "accuracy": rates["accuracy"]}


def admm_train(module, variables, feed: Feed, sparsity: Sparsity, target: Target, fit: FitConfig = FitConfig(),
               config: AdmmConfig = AdmmConfig(), masks=None, mesh=None):
    """ADMM training towards `target`: returns (variables, history of {step, rho, distance} per Z/U update).

    `masks` (e.g. an earlier round's) stay applied. The variables are not yet on the set: `sparsity.masks`
    gives the hard masks of their projection. Batches are split over `mesh` (default: every device).
    """
    check_admm_config(config)
    target = sparsity.check_target(target)
    masks = jax.tree.map(np.ones_like, variables) if masks is None else masks
    start = jax.tree.map(lambda v, m: v * m, variables["params"], masks["params"])
    update = jax.jit(lambda state, params: admm_update(sparsity, state, params, target, config))
    distance = jax.jit(lambda params: sparsity.distance(sparsity.kernels(params), target))
    history = [{"step": 0, "rho": float(config.rho), "distance": float(distance(start))}]

    def on_step(step, params, state):
        if step % config.interval:
            return state
        state = update(state, params)
        history.append({"step": step, "rho": float(state.rho[0]), "distance": float(distance(params))})
        return state

    def penalized(module, both):
        return Penalized(module, lambda params: admm_penalty(sparsity, both["phase"], params))

    init = jax.jit(lambda params: admm_init(sparsity, params, target, config))
    variables, _, metrics = _train(module, variables, masks, feed, fit, Hook(module=penalized), init(start), on_step,
                                   mesh)
    history.append({"step": fit.epochs * feed.steps, "rho": history[-1]["rho"],
                    "distance": float(distance(variables["params"])), **metrics})
    return variables, history


def masked_train(module, variables, masks, feed: Feed, fit: FitConfig = FitConfig(), mesh=None):
    """Retrain with `masks` fixed (every masked parameter stays zero): returns (variables, last epoch's metrics).
    Batches are split over `mesh` (default: every device)."""
    variables, _, metrics = _train(module, variables, masks, feed, fit, mesh=mesh)
    return variables, metrics
