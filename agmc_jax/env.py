"""The compression environment: step through channel groups, restrict actions to the budget, score.

One episode visits the prunable groups in network order. An action is a keep ratio in
[lbound, rbound]; AMC's "action wall" caps it so that, with every later group at lbound, the
budget stays reachable, so every finished policy meets it. Rewards come from one jit-compiled,
vmapped evaluation of the masked network on a held-out validation subset, after its BatchNorm
statistics are re-estimated on a few of those images (else a pruned ResNet scores near chance
whatever the policy, and the reward cannot tell policies apart).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.errors import AgmcError
from agmc_jax.prune.batchnorm import apply_recalibrated
from agmc_jax.prune.lstsq import prune_counts
from agmc_jax.prune.masks import CRITERIA, channel_ranks

REWARDS = ("acc", "acc_flops")


class BudgetError(AgmcError, ValueError):
    """A budget outside (0, 1) or below what the smallest allowed policy reaches."""


class EnvConfig(NamedTuple):
    """Budget and action space; defaults from AMC."""

    target_macs: float | None = 0.5  # fraction of the original MACs
    target_params: float | None = None  # fraction of the original parameters
    lbound: float = 0.2
    rbound: float = 1.0
    round_to: int = 1  # channel counts rounded down to a multiple of this (8 for accelerators)
    reward: str = "acc"  # acc | acc_flops
    criterion: str = "l2"  # l1 | l2 | lstsq (L2 choice, then AMC's least-squares refit of the next layers)
    calibration_images: int = 100  # reward images (labels unused) for BatchNorm statistics and the lstsq refit
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics of each pruned network before scoring it
    eval_batch: int = 500


def _check(config):
    for name in ("target_macs", "target_params"):
        value = getattr(config, name)
        if value is not None and not 0 < value < 1:
            raise BudgetError(f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
    if config.target_macs is None and config.target_params is None:
        raise BudgetError("give a budget: --target-macs or --target-params")
    if not 0 < config.lbound <= config.rbound <= 1:
        raise BudgetError(f"need 0 < lbound <= rbound <= 1, got {config.lbound}, {config.rbound}")
    if config.reward not in REWARDS:
        raise BudgetError(f"unknown reward {config.reward!r}; choose one of: {', '.join(REWARDS)}")
    if config.criterion not in CRITERIA:
        raise BudgetError(f"unknown criterion {config.criterion!r}; choose one of: {', '.join(CRITERIA)}")


class Budget:
    """Budget bookkeeping for one traced network: costs, the action wall, rounding, AMC states."""

    unit = "channels"

    def __init__(self, net, config: EnvConfig = EnvConfig()):
        _check(config)
        self.net, self.config = net, config
        self.step_layers = self._step_layers()
        self.sizes = np.array([self._step_size(t) for t in range(len(self.step_layers))])
        self.steps = len(self.sizes)
        if self.steps == 0:
            raise BudgetError(f"{type(net.module).__name__} has no prunable {self.unit}")
        self.min_counts = np.array([self._floor(max(1, int(np.ceil(config.lbound * s))), s) for s in self.sizes])
        self.targets = {}
        if config.target_macs is not None:
            self.targets["macs"] = config.target_macs * net.macs
        if config.target_params is not None:
            self.targets["params"] = config.target_params * net.params
        if not self.feasible(self.min_counts):
            smallest = self.cost(self.min_counts)
            raise BudgetError(
                f"the budget is below what lbound={config.lbound} allows: every step at lbound keeps "
                f"{smallest['macs'] / net.macs:.3f} of the MACs and {smallest['params'] / net.params:.3f} of the "
                "parameters; raise the budget or lower --lbound")

    # ----- steps: one channel group each ----------------------------------------------------
    def _step_layers(self):
        """Per step, the layers it prunes (a group's producers)."""
        return [[l for l in self.net.layers if l.name in g.producers] for g in self.net.groups]

    def _step_size(self, t):
        return self.net.group_sizes[t]

    def _step_macs(self, t):
        """MACs that go when step t keeps nothing."""
        return self.net.groups[t].macs

    def layer_usage(self, counts):
        """Per layer: (name, original size, kept) in the step's unit, for reports."""
        return [{"name": l.name, "out": l.out_channels,
                 "kept": int(counts[l.out_group]) if l.out_group >= 0 else l.out_channels} for l in self.net.layers]

    # ----- budget -------------------------------------------------------------------------
    def _floor(self, count, size):
        step = self.config.round_to
        return int(min(size, max(step, count // step * step))) if step > 1 else int(count)

    def cost(self, counts):
        """{'macs', 'params'} of the network that keeps `counts` per step."""
        macs, params = self.net.cost(counts)
        return {"macs": macs, "params": params}

    def feasible(self, counts) -> bool:
        cost = self.cost(counts)
        return all(cost[k] <= v * (1 + 1e-9) for k, v in self.targets.items())

    def max_count(self, t, counts) -> int:
        """The largest count for step t that keeps the budget reachable with later steps at lbound."""
        trial = np.array(counts, copy=True)
        trial[t + 1:] = self.min_counts[t + 1:]
        low, high = int(self.min_counts[t]), int(self.sizes[t])
        while low < high:
            middle = (low + high + 1) // 2
            trial[t] = middle
            if self.feasible(trial):
                low = middle
            else:
                high = middle - 1
        return max(self._floor(low, self.sizes[t]), int(self.min_counts[t]))

    def ratio_to_count(self, t, ratio, counts) -> int:
        """The count that a keep ratio becomes at step t once rounded and walled."""
        wanted = self._floor(int(np.floor(ratio * self.sizes[t] + 1e-9)), self.sizes[t])
        return int(np.clip(wanted, self.min_counts[t], self.max_count(t, counts)))

    def action_to_ratio(self, action):
        """Agent actions in [0, 1] to keep ratios in [lbound, rbound]."""
        return self.config.lbound + np.clip(action, 0.0, 1.0) * (self.config.rbound - self.config.lbound)

    def ratio_to_action(self, ratio):
        span = max(self.config.rbound - self.config.lbound, 1e-12)
        return float(np.clip((ratio - self.config.lbound) / span, 0.0, 1.0))

    def policy_counts(self, ratios):
        """Counts of a whole policy of keep ratios, walled step by step."""
        counts = np.array(self.sizes, copy=True)
        for t, ratio in enumerate(ratios):
            counts[t] = self.ratio_to_count(t, ratio, counts)
        return counts

    def _uniform(self, ratio):
        counts = np.array([self._floor(max(1, int(round(ratio * s))), s) for s in self.sizes])
        return np.maximum(counts, self.min_counts)

    def uniform_counts(self):
        """The largest single keep ratio that meets the budget (the handcrafted baseline)."""
        low, high = self.config.lbound, self.config.rbound
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if self.feasible(self._uniform(middle)) else (low, middle)
        return self._uniform(low)

    # ----- states -------------------------------------------------------------------------
    def amc_features(self):
        """AMC's static per-step features, min-max normalised: index, type, c_in, c_out, stride,
        kernel, #weights, MACs of the step."""
        rows = []
        for t, layers in enumerate(self.step_layers):
            layer = layers[0]
            kind = {"conv": 0.0, "grouped_conv": 0.0, "depthwise": 1.0, "dense": 2.0}[layer.kind]
            rows.append([t, kind, layer.in_channels, layer.out_channels, max(layer.stride or (1,)),
                         max(layer.kernel_size or (1,)), sum(l.params for l in layers), self._step_macs(t)])
        rows = np.array(rows, dtype=np.float64)
        span = rows.max(axis=0) - rows.min(axis=0)
        return ((rows - rows.min(axis=0)) / np.where(span > 0, span, 1)).astype(np.float32)

    def amc_state(self, static, t, counts, previous_action):
        """AMC's state at step t: static features, MACs reduced so far, MACs still to come, previous action."""
        decided = np.array(self.sizes, copy=True)
        decided[:t] = counts[:t]
        reduced = (self.net.macs - self.cost(decided)["macs"]) / self.net.macs
        rest = sum(self._step_macs(u) for u in range(t + 1, self.steps)) / self.net.macs
        return np.concatenate([static[t], [reduced, rest, previous_action]]).astype(np.float32)


class Environment(Budget):
    """A budget plus the reward: the pruned network's accuracy on a held-out validation set."""

    def __init__(self, net, variables, images, labels, config: EnvConfig = EnvConfig()):
        super().__init__(net, config)
        self.variables, self.images, self.labels = variables, images, labels
        self.calibration = images[:config.calibration_images]
        self._rank_tables(variables)
        self._recalibrated = jax.jit(self._recalibrate)
        self._score = jax.jit(self._accuracy)
        self._evaluate = jax.jit(lambda counts, x, y: jax.lax.map(
            lambda c: self._scored_accuracy(self.masked_variables(c), x, y), counts))

    def _rank_tables(self, variables):
        """Per variable axis: the group of each index and its importance rank within the group."""
        ranks = channel_ranks(self.net, variables, self.config.criterion)
        self._tables = []
        for leaf, maps in enumerate(self.net.axis_maps):
            if not self.net.is_param[leaf]:
                self._tables.append(())
                continue
            axes = []
            for axis, m in enumerate(maps):
                if (m.group >= 0).any():
                    rank = np.array([ranks[g][u] if g >= 0 else 0 for g, u in zip(m.group, m.unit)])
                    axes.append((axis, jnp.asarray(np.maximum(m.group, 0)), jnp.asarray(rank),
                                 jnp.asarray(m.group < 0)))
            self._tables.append(tuple(axes))

    def _recalibrate(self, variables):
        """`variables` with BatchNorm statistics re-estimated on the calibration images (if configured)."""
        if not self.config.recalibrate_bn:
            return variables
        return self.net.recalibrate(variables, self.calibration)

    def _prune(self, counts):
        """(variables, masks) of a policy before BatchNorm re-estimation."""
        return prune_counts(self.net, self.variables, counts, self.config.criterion, self.calibration)

    def pruned(self, counts):
        """(variables, masks) of the policy as exported and scored: masked, refitted when the criterion is
        lstsq, BatchNorm statistics re-estimated."""
        variables, masks = self._prune(counts)
        return self._recalibrated(variables), masks

    def export(self, variables, masks):
        """(module, variables) of the physically smaller network that a pruned policy computes."""
        return self.net.slim(variables, masks)

    def masked_variables(self, counts):
        """Variables masked for per-group counts (pure, traceable: counts may be a tracer)."""
        leaves = jax.tree.leaves(self.variables)
        out = []
        for leaf, tables in zip(leaves, self._tables):
            for axis, group, rank, fixed in tables:
                keep = (fixed | (rank < counts[group])).astype(leaf.dtype)
                view = [1] * leaf.ndim
                view[axis] = leaf.shape[axis]
                leaf = leaf * keep.reshape(view)
            out.append(leaf)
        return jax.tree.unflatten(self.net.treedef, out)

    def _correct(self, variables, images, labels):
        """How many of `images` the network classifies right, in batches of `eval_batch`."""
        batch = self.config.eval_batch
        usable = images.shape[0] // batch * batch
        correct = jnp.zeros((), jnp.int32)
        if usable:
            chunks = images[:usable].reshape(-1, batch, *images.shape[1:])
            logits = jax.lax.map(lambda x: self.net.module.apply(variables, x, **self.net.call_kwargs), chunks)
            correct = jnp.sum(jnp.argmax(logits, -1).reshape(-1) == labels[:usable])
        if usable < images.shape[0]:
            rest = self.net.module.apply(variables, images[usable:], **self.net.call_kwargs)
            correct = correct + jnp.sum(jnp.argmax(rest, -1) == labels[usable:])
        return correct

    def _accuracy(self, variables, images, labels):
        return self._correct(variables, images, labels) / images.shape[0]

    def _scored_accuracy(self, variables, images, labels):
        """Top-1 of masked `variables` as the reward scores them: BatchNorm statistics re-estimated on the
        calibration images, which are the first of `images`. The re-estimation pass's outputs are their
        predictions, so each image runs through the network once."""
        if not self.config.recalibrate_bn:
            return self._accuracy(variables, images, labels)
        calibration = len(self.calibration)
        logits, variables = apply_recalibrated(self.net.module, variables, images[:calibration],
                                               **self.net.call_kwargs)
        calibration_correct = jnp.sum(jnp.argmax(logits, -1) == labels[:calibration])
        rest_correct = self._correct(variables, images[calibration:], labels[calibration:])
        return (calibration_correct + rest_correct) / images.shape[0]

    def accuracy(self, counts_batch) -> np.ndarray:
        """Top-1 validation accuracy of each policy in a batch of per-group counts [P, T].

        One compiled call evaluates the whole batch (compiled once per batch size P); with the
        lstsq criterion each policy is refitted on the host first, then scored by one compiled call.
        """
        if self.config.criterion == "lstsq":
            return np.array([float(self._score(self.pruned(counts)[0], self.images, self.labels))
                             for counts in counts_batch])
        return np.asarray(self._evaluate(jnp.asarray(counts_batch, jnp.int32), self.images, self.labels))

    def reward(self, accuracy, counts):
        """`acc`, or `acc_flops` = -error * log(MACs) (AMC)."""
        if self.config.reward == "acc":
            return float(accuracy)
        return float(-(1.0 - accuracy) * np.log(self.net.cost(counts)[0]))
