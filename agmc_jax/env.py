"""The compression environment over a kind: the budget and its action wall, and the reward, in jax.numpy.

One episode visits the kind's steps in order. The kind's action space maps an action in [0, 1] to a
count (channels and weights: a keep ratio in [lbound, rbound]; bits: HAQ's bit width in [min_bit,
max_bit]); AMC's "action wall" caps it so that, with every later step at its lowest count, the
budget stays reachable, so every finished policy meets it. The reward is the accuracy of the
masked network on held-out images, after its BatchNorm statistics are re-estimated on the first of
them (else a pruned ResNet scores near chance whatever the policy); a reward that `finetunes` first
trains the masked network a few SGD steps on training batches (its zeros kept), which predicts the
accuracy after the real fine-tune far better (experiments/proxy_study.py). Everything a step or a reward
computes is pure and traceable; the images are sharded over the mesh's data axis and every array
the evaluation reads is an argument (`Environment.data`), never a constant of the executable.
"""
import copy
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agmc_jax.errors import AgmcError, BudgetError, DataError
from agmc_jax.hosts import place
from agmc_jax.kinds import options_of
from agmc_jax.prune.admm import FitConfig
from agmc_jax.prune.batchnorm import apply_recalibrated
from agmc_jax.prune.masks import CRITERIA
from agmc_jax.train import DTYPES, OptimizerSpec, compute_dtype, make_optimizer

SLACK = 1e-6  # relative: beyond 2^24 MACs or parameters float32 costs round (by ~1e-7); the host allows this much


class EnvConfig(NamedTuple):
    """Budget and action space; defaults from AMC."""

    target_macs: float | None = 0.5  # fraction of the original MACs
    target_params: float | None = None  # fraction of the original parameters
    lbound: float = 0.2
    rbound: float = 1.0
    round_to: int | None = None  # channel counts in multiples of this; None: `channel_multiples` (8 where it pays)
    reward: str = "acc"  # acc | acc_flops | acc_norm (see REWARDS)
    criterion: str = "l2"  # l1 | l2 | lstsq (L2 choice, then AMC's least-squares refit of the next layers)
    calibration_images: int = 100  # reward images (labels unused) for BatchNorm statistics
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics of each pruned network before scoring it
    eval_batch: int = 500
    target_size: float | None = None  # fraction of the float32 size in bits: the bits kind's budget
    kind_options: tuple = ()  # sorted (name, value) pairs of the kind's `Options` (bits: min_bit, max_bit, pinned_bits)
    fill: bool = True  # raise each walled policy to the budget (Budget.filled): the budget is used, not left
    reward_steps: int = 32  # a reward that finetunes: SGD steps of masked fine-tuning before scoring
    reward_lr: float = 0.02  # its constant learning rate (agmc compress fine-tunes from 0.02)
    reward_batch: int = 128  # its training images per step
    reward_dtype: str = "float32"  # compute dtype of the reward's evaluation (bfloat16 on accelerators); weights,
    # BatchNorm statistics and the export stay float32 (experiments/bf16_reward.py measures the ranking it gives)


def _accuracy_reward(accuracy, resource, bounds):
    """`acc`: top-1 of the compressed network."""
    return accuracy


def _error_flops_reward(accuracy, resource, bounds):
    """`acc_flops`: -error * log(resource), AMC's resource-aware reward (MACs; size in bits for bit widths)."""
    return -(1.0 - accuracy) * jnp.log(resource)


def _normalised_reward(accuracy, resource, bounds):
    """`acc_norm`: the two-stage DRL paper's synthetic reward, (accuracy + saving) / 2 in [0, 1], where saving =
    (high - resource) / (high - low) normalises the resource (MACs; size in bits for bit widths) by the lowest
    and highest a walled policy can have (the paper's lowest and highest FLOPs observed, known in advance here
    so the reward stays pure). Our reconstruction: the paper's formula was lost from its text."""
    low, high = bounds
    saving = (high - resource) / jnp.maximum(high - low, 1.0)
    return (accuracy + jnp.clip(saving, 0.0, 1.0)) / 2


class Reward(NamedTuple):
    """A reward: `score(accuracy, resource, bounds)`; `finetunes`: the accuracy is measured after `reward_steps`
    steps of masked fine-tuning on training batches (the environment then needs training data)."""

    score: Callable
    description: str
    finetunes: bool = False


REWARDS = {
    "acc": Reward(_accuracy_reward, "top-1 of the pruned network, BatchNorm re-estimated"),
    "acc_flops": Reward(_error_flops_reward, "-error * log(MACs), AMC's resource-aware reward"),
    "acc_norm": Reward(_normalised_reward, "(top-1 + normalised saving) / 2, the two-stage DRL paper's"),
    "finetuned": Reward(_accuracy_reward, "top-1 after --reward-steps steps of masked fine-tuning (zeros kept, "
                        "BatchNorm re-estimated after): predicts the fine-tuned accuracy", finetunes=True),
}


def register_reward(name: str, reward: Reward) -> None:
    """Add a reward that `EnvConfig.reward`, `--reward` and `agmc_jax.search` accept by `name`."""
    if not isinstance(reward, Reward):
        raise AgmcError(f"register_reward takes a Reward, got {type(reward).__name__}")
    REWARDS[name] = reward


def check_config(config: EnvConfig) -> None:
    """Raise `BudgetError` on a budget or setting that cannot run."""
    for name in ("target_macs", "target_params", "target_size"):
        value = getattr(config, name)
        if value is not None and not 0 < value < 1:
            raise BudgetError(f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
    if config.target_macs is None and config.target_params is None and config.target_size is None:
        raise BudgetError("give a budget: --target-macs or --target-params (--target-size for bit widths)")
    if not isinstance(config.kind_options, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in config.kind_options):
        raise BudgetError(f"kind_options must be a tuple of (name, value) pairs (hashable), got "
                          f"{config.kind_options!r}")
    if not 0 < config.lbound <= config.rbound <= 1:
        raise BudgetError(f"need 0 < lbound <= rbound <= 1, got {config.lbound}, {config.rbound}")
    if config.reward not in REWARDS:
        raise BudgetError(f"unknown reward {config.reward!r}; choose one of: {', '.join(REWARDS)}")
    if config.criterion not in CRITERIA:
        raise BudgetError(f"unknown criterion {config.criterion!r}; choose one of: {', '.join(CRITERIA)}")
    if config.round_to is not None and config.round_to < 1:
        raise BudgetError(f"--round-to must be a positive integer, got {config.round_to}")
    if config.calibration_images < 1 or config.eval_batch < 1:
        raise BudgetError("calibration_images and eval_batch must be positive")
    for name in ("reward_steps", "reward_batch"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise BudgetError(f"--{name.replace('_', '-')} must be a positive whole number, got {value}")
    if not (np.isfinite(config.reward_lr) and config.reward_lr > 0):
        raise BudgetError(f"reward_lr must be a positive finite learning rate, got {config.reward_lr}")
    if config.reward_dtype not in DTYPES:
        raise BudgetError(f"unknown --reward-dtype {config.reward_dtype!r}; choose one of: {', '.join(DTYPES)}")
    if REWARDS[config.reward].finetunes and not config.recalibrate_bn:
        raise BudgetError(f"the {config.reward} reward re-estimates BatchNorm after training each candidate; "
                          "drop --no-recalibrate-bn")


AUTO_MULTIPLE = 8  # AMC's rounding; on this 2-core CPU ResNet-20 at 50% MACs ran 0.74-0.94x dense at 11/23/45 channels,
# 1.38-1.54x at 8/24/48 (1.55-1.61x in CPU time; experiments/bench_slim.py, batch 256, BatchNorm folded)


def channel_multiples(sizes, round_to=None) -> np.ndarray:
    """The multiple each step's count is rounded to: `round_to`, or by default 8 for steps of 16 channels or more and
    1 below, where multiples of 8 would leave a step (LeNet-5's 6 channels) no choice."""
    sizes = np.asarray(sizes, np.int64)
    if round_to is None:
        return np.where(sizes >= 2 * AUTO_MULTIPLE, AUTO_MULTIPLE, 1)
    return np.full(sizes.shape, round_to, np.int64)


def rounded_counts(sizes, keep, round_to=None) -> np.ndarray:
    """Counts keeping the ratio `keep` of each step, each the nearest multiple of its `channel_multiples`
    (at least one multiple, at most the size): what `agmc prune --keep` slims to."""
    sizes = np.asarray(sizes, np.int64)
    multiples = channel_multiples(sizes, round_to)
    nearest = np.round(keep * sizes / multiples).astype(np.int64) * multiples  # as `keep_counts` where exact
    return np.minimum(sizes, np.maximum(multiples, nearest))


class KeepRatios:
    """The action space of channels and weights: an action is a keep ratio in [lbound, rbound] of the step's
    size, rounded down to a multiple of the step's `multiples` (channels: `channel_multiples`; weights and columns:
    round_to, else 1); budgets on MACs and parameters (fractions of the dense ones).

    An action space gives `low` and `high` counts per step, the traceable `wanted(t, action, dtype)`
    (before the wall), `round_down(t, count)`, `action(t, count)` (the inverse), `feasible(counts, xp)`,
    `uniform()` (the handcrafted policy), and the `resources` its cost vector counts, their `totals` and
    `targets`. It may give `arguments()` (the arrays that depend on the budget and lbound) and `bound(arguments)`
    (a copy reading them, traced): the compiled search then takes them as an argument and one program serves
    every budget; a space without them is compiled with its budget as constants.
    """

    resources = ("macs", "params")

    def __init__(self, kind, config: EnvConfig):
        if config.target_size is not None:
            raise BudgetError(f"--target-size budgets bit widths; pruning {kind.unit} takes --target-macs or "
                              "--target-params")
        self.kind, self.config = kind, config
        self.lbound, self.span = config.lbound, config.rbound - config.lbound  # what actions map over (traced: bound)
        self.high = np.asarray(kind.sizes, np.int64)
        if len(self.high) == 0:
            raise BudgetError(f"{type(kind.net.module).__name__} has no prunable {kind.unit}")
        if config.round_to is not None and config.round_to > self.high.max():
            raise BudgetError(f"--round-to {config.round_to} is larger than every step ({self.high.max()} "
                              f"{kind.unit} at most); choose a smaller multiple")
        automatic = config.round_to is None and kind.unit != "channels"  # rounding pays for channels only
        self.multiples = channel_multiples(self.high, 1 if automatic else config.round_to)
        self.low = np.array([self.floor(max(1, int(np.ceil(config.lbound * s))), s, m, np)
                             for s, m in zip(self.high, self.multiples)])
        full = kind.cost(self.high)
        self.totals = np.array([full[0], full[1]], np.float64)
        targets = [config.target_macs, config.target_params]
        self.targets = np.array([np.inf if v is None else v * t for v, t in zip(targets, self.totals)], np.float64)
        if not self.feasible(self.low):
            macs, params = kind.cost(self.low)
            raise BudgetError(
                f"the budget is below what lbound={config.lbound} allows: every step at lbound keeps "
                f"{macs / self.totals[0]:.3f} of the MACs and {params / self.totals[1]:.3f} of the "
                "parameters; raise the budget or lower --lbound")

    def arguments(self) -> dict:
        """The budget's and lbound's arrays, as the compiled search takes them (`bound`)."""
        return {"targets": np.asarray(self.targets, np.float32), "low": np.asarray(self.low, np.int32),
                "lbound": np.asarray(self.lbound, np.float32), "span": np.asarray(self.span, np.float32)}

    def bound(self, arguments) -> "KeepRatios":
        """This space reading `arguments` (traced) in place of its budget and lbound (traceable methods only)."""
        space = copy.copy(self)
        space.targets, space.low, space.lbound, space.span = (arguments[key]
                                                              for key in ("targets", "low", "lbound", "span"))
        return space

    def feasible(self, counts, xp=np):
        """Whether a policy meets every budget: in float32 when traced (the wall), up to `SLACK` on the host."""
        macs, params = self.kind.cost(counts, xp)
        slack = 1 + (SLACK if xp is np else 0.0)
        return (macs <= self.targets[0] * slack) & (params <= self.targets[1] * slack)

    @staticmethod
    def floor(count, size, step, xp=jnp):
        """`count` rounded down to a multiple of `step`, at least `step` and at most `size` (`count` when step is 1)."""
        return xp.where(step > 1, xp.minimum(size, xp.maximum(step, count // step * step)), count)

    def round_down(self, t, count):
        """A count of step t on the rounding grid (traceable)."""
        return self.floor(count, jnp.asarray(self.high)[t], jnp.asarray(self.multiples)[t])

    def wanted(self, t, action, dtype):
        """The count an action in [0, 1] asks for at step t, before the wall (traceable)."""
        ratio = self.lbound + jnp.clip(action, 0.0, 1.0) * self.span
        size = jnp.asarray(self.high)[t]
        wanted = jnp.floor(ratio * size + 1e-4).astype(dtype)  # float32 lands below n
        return self.floor(wanted, size, jnp.asarray(self.multiples)[t])

    def action(self, t, count):
        """The action in [0, 1] whose ratio is exactly count / size (what the agent is told it did)."""
        ratio = count / jnp.asarray(self.high, jnp.float32)[t]
        return jnp.clip((ratio - self.lbound) / jnp.maximum(self.span, 1e-12), 0.0, 1.0)

    def uniform(self):
        """The largest single keep ratio that meets the budget (the handcrafted baseline)."""
        def uniform(ratio):
            counts = np.array([self.floor(max(1, int(round(ratio * s))), s, m, np)
                               for s, m in zip(self.high, self.multiples)])
            return np.maximum(counts, self.low)

        low, high = self.config.lbound, self.config.rbound
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if self.feasible(uniform(middle)) else (low, middle)
        return uniform(low)


def action_space(kind, config: EnvConfig):
    """The kind's own action space and budget (`kind.action_space(config)`, e.g. bit widths), else keep ratios."""
    own = getattr(kind, "action_space", None)
    return KeepRatios(kind, config) if own is None else own(config)


class Budget:
    """A kind's steps under a budget: the action space, the action wall and feasibility, in NumPy or jax.numpy."""

    def __init__(self, kind, config: EnvConfig = EnvConfig()):
        check_config(config)
        options_of(kind, config)
        self.kind, self.net, self.config = kind, kind.net, config
        self.space = action_space(kind, config)
        self.sizes, self.min_counts = self.space.high, self.space.low
        self.steps = len(self.sizes)
        self.resources, self.totals, self.targets = self.space.resources, self.space.totals, self.space.targets
        lowest = float(self.cost(self.min_counts)[0])  # of the first resource, the one rewards read
        self.bounds = (lowest, float(min(self.targets[0], self.totals[0])))
        self._walked = jax.jit(self._walk)

    def arguments(self) -> dict:
        """What of this budget a compiled search takes as an argument: the reward's `bounds`, and the action
        space's budget arrays where it gives them (`KeepRatios.arguments`)."""
        own = getattr(self.space, "arguments", None)
        return {"bounds": np.asarray(self.bounds, np.float32), **({"space": own()} if own is not None else {})}

    def bound(self, arguments) -> "Budget":
        """A copy whose budget is read from `arguments` (traced: inside the compiled search), so that one program
        serves every budget; its host conveniences (`feasible` on NumPy, `uniform_counts`) are the original's."""
        bound = copy.copy(self)
        bound.bounds = (arguments["bounds"][0], arguments["bounds"][1])
        if "space" in arguments:
            bound.space = self.space.bound(arguments["space"])
            bound.min_counts, bound.targets = bound.space.low, bound.space.targets
        return bound

    def cost(self, counts, xp=np):
        """The policy's cost vector (`resources`: MACs and parameters; size in bits for bit widths)."""
        return self.kind.cost(counts, xp)

    def ratios(self, counts):
        """Each resource of a policy as a fraction of its total, e.g. {"macs_ratio": 0.49, "params_ratio": 0.6}."""
        return {f"{name}_ratio": float(value / total)
                for name, value, total in zip(self.resources, self.cost(counts), self.totals)}

    def feasible(self, counts, xp=np):
        """Whether a policy meets the budget (traceable with `xp=jnp`: what the wall decides with)."""
        return self.space.feasible(counts, xp)

    def max_count(self, t, counts):
        """The largest count for step t that keeps the budget reachable with later steps lowest (traceable)."""
        later = jnp.arange(self.steps) > t
        trial = jnp.where(later, jnp.asarray(self.min_counts), counts)
        return self._largest(t, trial, jnp.asarray(self.min_counts)[t])

    def _largest(self, t, trial, low):
        """The largest count of step t on its grid, at least `low`, with which `trial` (its other steps as they
        are) meets the budget (traceable; `low` must meet it)."""
        high = jnp.asarray(self.sizes)[t]

        def bisect(_, bounds):
            low, high = bounds
            middle = (low + high + 1) // 2
            fits = self.feasible(trial.at[t].set(middle), jnp)
            return jnp.where(fits, middle, low), jnp.where(fits, high, middle - 1)

        found, _ = jax.lax.fori_loop(0, int(self.sizes.max()).bit_length() + 1, bisect, (low, high))
        return jnp.maximum(self.space.round_down(t, found), low)

    def action_count(self, t, action, counts):
        """The count an action in [0, 1] becomes at step t once mapped by the action space and walled (traceable)."""
        wanted = self.space.wanted(t, action, counts.dtype)
        return jnp.clip(wanted, jnp.asarray(self.min_counts)[t], self.max_count(t, counts))

    def count_action(self, t, count):
        """The action in [0, 1] that asks for exactly `count` at step t (what the agent is told it did)."""
        return self.space.action(t, count)

    def policy_counts(self, actions):
        """Counts of a whole policy of actions in [0, 1], walled step by step (host convenience)."""
        return np.asarray(self._walked(jnp.asarray(actions, jnp.float32)))

    def _walk(self, actions):
        def step(counts, t):
            return counts.at[t].set(self.action_count(t, actions[t], counts)), None
        return jax.lax.scan(step, jnp.asarray(self.sizes, jnp.int32), jnp.arange(self.steps))[0]

    def shifted(self, counts):
        """`counts` (walled, so within the budget) raised by the largest shift of every step's action that stays
        within it (traceable): AutoCompress rescales each neighbour to its target. A shared shift keeps the actions'
        order, so the experience rule still holds; the step whose count would rise first at a cost over the budget
        stops it."""
        steps = jnp.arange(self.steps)
        lowest, sizes = jnp.asarray(self.min_counts), jnp.asarray(self.sizes)
        actions = self.count_action(steps, counts)

        def shifted(delta):
            wanted = jax.vmap(lambda t, a: self.space.wanted(t, a, counts.dtype))(steps, actions + delta)
            return jnp.clip(wanted, lowest, sizes)

        def bisect(_, bounds):
            low, high = bounds
            middle = (low + high) / 2
            fits = self.feasible(shifted(middle), jnp)
            return jnp.where(fits, middle, low), jnp.where(fits, high, middle)

        low, _ = jax.lax.fori_loop(0, 24, bisect, (jnp.float32(0.0), jnp.float32(1.0)))
        raised = shifted(low)
        return jnp.where(self.feasible(raised, jnp) & jnp.all(raised >= counts), raised, counts)

    def filled(self, counts):
        """`counts` (within the budget) raised to it (traceable): `shifted`, then each step in turn to the most the
        others leave it. Costs only grow with counts, so after that one pass no step can take one more rounding
        step within the budget (what `EnvConfig.fill`, the default, does to every policy a search plays)."""
        return jax.lax.fori_loop(0, self.steps, lambda t, c: c.at[t].set(self._largest(t, c, c[t])),
                                 self.shifted(counts))

    def uniform_counts(self):
        """The handcrafted baseline: one level everywhere (keep ratio, bit width), the largest within budget."""
        return self.space.uniform()


def _layout(images, labels, first, batch, devices):
    """Images from `first` on as [chunks, rows, ...] with rows a multiple of `devices`; padding has label -1."""
    images, labels = images[first:], labels[first:]
    count = images.shape[0]
    rows = -(-min(batch, max(count, 1)) // devices) * devices
    chunks = -(-count // rows)
    padding = chunks * rows - count
    images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.full(padding, -1, labels.dtype)])
    return images.reshape(chunks, rows, *images.shape[1:]), labels.reshape(chunks, rows)


def _training_batches(images, labels, steps, batch):
    """`steps` batches of `batch` training images, [steps, batch, ...], taken in order and wrapping around."""
    chosen = np.arange(steps * batch) % images.shape[0]
    return images[chosen].reshape(steps, batch, *images.shape[1:]), labels[chosen].reshape(steps, batch)


class Environment(Budget):
    """A budget plus the reward: the pruned network's accuracy on held-out images, spread over a mesh.

    `train = (images, labels)` feeds a reward that finetunes (each step reads the next `reward_batch` of them,
    wrapping around); every candidate trains on the same batches, so their scores differ by the policy alone."""

    def __init__(self, kind, variables, images, labels, config: EnvConfig = EnvConfig(), mesh: Mesh | None = None,
                 train=None):
        super().__init__(kind, config)
        images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
        self.mesh = mesh or Mesh(np.array(jax.devices()), ("data",))
        self.finetunes = REWARDS[config.reward].finetunes
        if self.finetunes and not hasattr(kind, "keep"):
            raise BudgetError(f"the {config.reward} reward trains masked networks; the {kind.unit} kind has no keep "
                              "mask: choose another --reward")
        if self.finetunes and train is None:
            raise DataError(f"the {config.reward} reward trains each candidate: give training data "
                            "(train_data=(images, labels))")
        devices = self.mesh.devices.size
        calibration = min(config.calibration_images, images.shape[0])
        self.count = images.shape[0]
        scored = calibration if config.recalibrate_bn else 0
        replicated = NamedSharding(self.mesh, P())
        split = NamedSharding(self.mesh, P("data")) if calibration % devices == 0 else replicated
        rest, rest_labels = _layout(images, labels, scored, config.eval_batch, devices)
        placed = {"kind": kind.prepare(variables, images), "budget": self.arguments(),
                  "calibration": images[:calibration], "calibration_labels": labels[:calibration],
                  "images": rest, "labels": rest_labels}
        shardings = {"kind": replicated, "budget": replicated, "calibration": split, "calibration_labels": split,
                     "images": NamedSharding(self.mesh, P(None, "data")),
                     "labels": NamedSharding(self.mesh, P(None, "data"))}
        if self.finetunes:
            batches = _training_batches(np.asarray(train[0], np.float32), np.asarray(train[1], np.int32),
                                        config.reward_steps, config.reward_batch)
            placed.update(train_images=batches[0], train_labels=batches[1])
            by_batch = NamedSharding(self.mesh, P(None, "data")) if config.reward_batch % devices == 0 else replicated
            shardings.update(train_images=by_batch, train_labels=by_batch)
        self.data = place(placed, shardings)
        self._scores, self._steps = jax.jit(self.scores), None

    # ----- reward (pure) ----------------------------------------------------------------------
    def _apply(self, variables, x):
        """Logits in float32, computed in `reward_dtype`."""
        dtype = self.config.reward_dtype
        return self.net.module.apply(compute_dtype(variables, dtype), compute_dtype(x, dtype),
                                     **self.net.call_kwargs).astype(jnp.float32)

    def _correct(self, variables, images, labels):
        """How many of the [chunks, rows] laid-out images the network classifies right."""
        if images.shape[0] == 0:
            return jnp.zeros((), jnp.int32)
        logits = jax.lax.map(lambda x: self._apply(variables, x), images)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    def recalibrated(self, data, variables, dtype=None):
        """(calibration images' logits or None, variables with BatchNorm re-estimated on them) (pure); the pass runs
        in `dtype` (default `reward_dtype`), the statistics come back in float32."""
        if not self.config.recalibrate_bn:
            return None, variables
        dtype = self.config.reward_dtype if dtype is None else dtype
        logits, new = apply_recalibrated(self.net.module, compute_dtype(variables, dtype),
                                         compute_dtype(data["calibration"], dtype), **self.net.call_kwargs)
        return logits.astype(jnp.float32), jax.tree.map(lambda n, v: n.astype(v.dtype), new, variables)

    def _fit(self, data, counts, variables):
        """(the SGD optimizer, one step (params, opt_state, images, labels) -> (params, opt_state)) of the policy's
        masked fine-tune: what it drops stays zero; BatchNorm normalises with each batch's statistics, as in
        training (pure)."""
        keep = self.kind.keep(data["kind"], counts)["params"]
        fit = FitConfig()
        optimizer = make_optimizer(OptimizerSpec(self.config.reward_lr, fit.momentum, fit.weight_decay, "constant",
                                                 0, self.config.reward_steps))

        def loss(params, images, labels):
            logits, _ = apply_recalibrated(self.net.module, {**variables, "params": params}, images,
                                           **self.net.call_kwargs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        def step(params, opt_state, images, labels):
            updates, opt_state = optimizer.update(jax.grad(loss)(params, images, labels), opt_state, params)
            return jax.tree.map(jnp.multiply, optax.apply_updates(params, updates), keep), opt_state

        return optimizer, step

    def finetuned(self, data, counts, variables):
        """`variables` (the policy's masked ones) after `reward_steps` SGD steps on the training batches (pure: the
        compiled search's reward)."""
        optimizer, step = self._fit(data, counts, variables)
        params = variables["params"]
        (params, _), _ = jax.lax.scan(lambda carry, batch: (step(*carry, *batch), None),
                                      (params, optimizer.init(params)), (data["train_images"], data["train_labels"]))
        return {**variables, "params": params}

    def _finetuned_accuracy(self, counts_batch) -> np.ndarray:
        """`accuracy` of a reward that finetunes, its SGD steps driven from the host one compiled step at a time:
        XLA's CPU backend runs a gradient inside a compiled loop about 13x slower than outside one (ResNet-20,
        batch 128: 4.3 s against 0.33 s for two steps), and a re-rank trains a hundred steps per policy."""
        if self._steps is None:
            def start(data, counts):
                variables = self.kind.mask(data["kind"], counts)
                return variables, self._fit(data, counts, variables)[0].init(variables["params"])

            def one(data, counts, variables, opt_state, t):
                step = self._fit(data, counts, variables)[1]
                params, opt_state = step(variables["params"], opt_state, data["train_images"][t],
                                         data["train_labels"][t])
                return {**variables, "params": params}, opt_state

            def scored(data, variables):
                logits, variables = self.recalibrated(data, variables)
                correct = self._correct(variables, data["images"], data["labels"])
                return (correct + jnp.sum(jnp.argmax(logits, -1) == data["calibration_labels"])) / self.count

            self._steps = jax.jit(start), jax.jit(one, donate_argnums=(2, 3)), jax.jit(scored)
        start, one, scored = self._steps
        accuracies = []
        for counts in np.asarray(counts_batch, np.int32):
            variables, opt_state = start(self.data, counts)
            for t in range(self.config.reward_steps):
                variables, opt_state = one(self.data, counts, variables, opt_state, t)
            accuracies.append(float(scored(self.data, variables)))
        return np.asarray(accuracies, np.float32)

    def score(self, data, counts):
        """Top-1 of the policy `counts` on the reward images (after its fine-tune for a reward that finetunes); the
        re-estimation pass scores its own images."""
        variables = self.kind.mask(data["kind"], counts)
        if self.finetunes:
            variables = self.finetuned(data, counts, variables)
        logits, variables = self.recalibrated(data, variables)
        correct = self._correct(variables, data["images"], data["labels"])
        if logits is not None:
            correct = correct + jnp.sum(jnp.argmax(logits, -1) == data["calibration_labels"])
        return correct / self.count

    def scores(self, data, counts_batch):
        """Top-1 of each policy in a batch of counts [P, T]: fine-tuned candidates side by side (vmapped), else
        one after another in one program."""
        if self.finetunes:
            return jax.vmap(lambda counts: self.score(data, counts))(counts_batch)
        return jax.lax.map(lambda counts: self.score(data, counts), counts_batch)

    def reward(self, accuracy, counts):
        """The configured reward of a policy from its accuracy and the kind's first resource (MACs; size in bits
        for bit widths) within its `bounds` (traceable)."""
        return REWARDS[self.config.reward].score(accuracy, self.cost(counts, jnp)[0], self.bounds)

    # ----- host conveniences ------------------------------------------------------------------
    def accuracy(self, counts_batch) -> np.ndarray:
        """Top-1 of each policy in a batch [P, T] (one compilation per batch size; a reward that finetunes runs its
        steps one compiled call at a time, the same numbers as `scores`)."""
        if self.finetunes:
            return self._finetuned_accuracy(counts_batch)
        return np.asarray(self._scores(self.data, jnp.asarray(counts_batch, jnp.int32)))

    def pruned(self, counts):
        """(variables, masks) of the policy as scored and exported: masked (refitted for lstsq), BatchNorm
        statistics re-estimated."""
        counts = jnp.asarray(counts, jnp.int32)
        variables = jax.jit(lambda data: self.recalibrated(data, self.kind.mask(data["kind"], counts),
                                                           "float32")[1])(self.data)
        return jax.device_get(variables), self.kind.masks(jax.device_get(self.data["kind"]), np.asarray(counts))

    def export(self, counts):
        """(module, variables) of the exported network of a policy (physically smaller for channels)."""
        return self.kind.export(*self.pruned(counts))
