"""Bit widths (HAQ): one step per searched convolution or dense kernel, counts are its weight bits.

Weights are quantized linearly, symmetric, per output channel (`agmc_jax.quant.fake_quantize`, the
bit width a traced value: one compiled evaluation scores every policy); activations stay float, as
in HAQ's model-size setting. The first and last quantized layers are pinned at `pinned_bits` (8, as
HAQ) and are not steps. The budget is the model's size in bits (`agmc_jax.quant.size`), a
fraction `target_size` of its float32 size, decided exactly in integers. The bit range and the pinned
width are the kind's options (`Bits.Options`, given as the environment config's `kind_options`).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.errors import BudgetError
from agmc_jax.graph.graphs import node_layers
from agmc_jax.kinds.options import options_of
from agmc_jax.quant.fake import fake_quantize
from agmc_jax.quant.qat import MAX_BITS, MIN_BITS
from agmc_jax.quant.size import FLOAT_BITS, MAX_STEPS, MAX_WEIGHTS, fits, size_bits, size_model


class BitWidths:
    """The bits kind's action space: HAQ's bit width round((max - min + 1) * a + min - 0.5) of an action a in
    [0, 1], clipped to [min_bit, max_bit]; the budget is the size in bits (see `agmc_jax.env.KeepRatios` for
    the protocol)."""

    resources = ("size",)

    def __init__(self, kind, config):
        options = kind.options
        if config.target_macs is not None or config.target_params is not None:
            raise BudgetError("bit widths change neither MACs nor parameters: give the bits kind target_size "
                              "only (target_macs=None, target_params=None)")
        if config.target_size is None:
            raise BudgetError("the bits kind needs a size budget: --target-size (a fraction of the float32 size)")
        self.kind, self.min_bit, self.max_bit = kind, options.min_bit, options.max_bit
        steps = len(kind.step_layers)
        self.low = np.full(steps, options.min_bit, np.int64)
        self.high = np.full(steps, options.max_bit, np.int64)
        self.totals = np.array([kind.model.float32], np.float64)
        self.targets = config.target_size * self.totals
        if not self.feasible(self.low):
            lowest = size_bits(kind.model, self.low) / kind.model.float32
            raise BudgetError(f"the size budget {config.target_size} is below what min_bit={options.min_bit} "
                              f"allows ({lowest:.4f} of the float32 size with every searched layer at "
                              f"{options.min_bit} bits); raise --target-size or lower --min-bit")

    def feasible(self, counts, xp=np):
        """Whether the policy's size in bits is within the budget, exactly (NumPy int64 or jnp int32 limbs)."""
        return fits(self.kind.model, counts, self.targets[0], xp)

    def round_down(self, t, count):
        """Every bit width is on the grid."""
        return count

    def wanted(self, t, action, dtype):
        """HAQ's bit width of an action in [0, 1] (traceable; rounds half to even, as NumPy and Python)."""
        span = self.max_bit - self.min_bit + 1
        bits = jnp.round(span * jnp.clip(action, 0.0, 1.0) + self.min_bit - 0.5)
        return jnp.clip(bits, self.min_bit, self.max_bit).astype(dtype)

    def action(self, t, count):
        """The centre of the actions that ask for `count` bits: (count - min + 0.5) / (max - min + 1)."""
        return jnp.clip((count - self.min_bit + 0.5) / (self.max_bit - self.min_bit + 1), 0.0, 1.0)

    def uniform(self):
        """The largest single bit width of every searched layer that meets the budget."""
        widths = [b for b in range(self.min_bit, self.max_bit + 1) if self.feasible(np.full(len(self.low), b))]
        return np.full(len(self.low), widths[-1], np.int64)


class Bits:
    """The bit-width kind: steps, exact size model, fake-quantized variables, the quantized export."""

    unit = "bits"
    export_name = "quantized"
    default_budget = {"target_size": 0.25}

    class Options(NamedTuple):
        """The weight bit widths searched, and those of the first and last quantized layers; HAQ's defaults."""

        min_bit: int = 2
        max_bit: int = 8
        pinned_bits: int | None = 8  # not searched; None: search them too

    @staticmethod
    def check_options(options, config):
        """Raise `BudgetError` on widths outside 1..16, a range upside down, or a size budget (`config.target_size`)
        that no network reaches at min_bit: before the network is traced."""
        for name, value in options._asdict().items():
            if value is None and name == "pinned_bits":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not MIN_BITS <= value <= MAX_BITS:
                raise BudgetError(f"--{name.replace('_', '-')} must be a whole number of bits in "
                                  f"{MIN_BITS}..{MAX_BITS}, got {value}")
        if options.min_bit > options.max_bit:
            raise BudgetError(f"--min-bit {options.min_bit} is above --max-bit {options.max_bit}; swap them")
        size = config.target_size  # one outside (0, 1) is the environment's error (`agmc_jax.env.check_config`)
        if size is not None and 0 < size < 1 and size * FLOAT_BITS < options.min_bit:
            raise BudgetError(f"--target-size {config.target_size} is below what any network reaches with weights "
                              f"of --min-bit {options.min_bit} ({options.min_bit}/{FLOAT_BITS} of the float32 size, "
                              "before scales and unquantized variables); raise --target-size or lower --min-bit")

    def __init__(self, net, config):
        self.net, self.config, self.options = net, config, options_of(self, config)
        layers = [(layer, op.leaf) for layer, op in zip(net.layers, net.analysis.layers)]
        self._layer_leaves = tuple(leaf for _, leaf in layers)
        pinned_bits = self.options.pinned_bits
        ends = {0, len(layers) - 1} if pinned_bits is not None else set()
        self.pinned = {leaf: pinned_bits for i, (_, leaf) in enumerate(layers) if i in ends}
        searched = [(i, layer, leaf) for i, (layer, leaf) in enumerate(layers) if i not in ends]
        if not searched:
            raise BudgetError(f"{type(net.module).__name__} has no layer left to search bits for: its "
                              f"{len(layers)} quantizable layers are pinned; set pinned_bits=None")
        self.leaves = tuple(leaf for _, _, leaf in searched)
        self.model = size_model(net.shapes, self.leaves, self.pinned)
        if len(searched) > MAX_STEPS or self.model.weights.max() > MAX_WEIGHTS:
            raise BudgetError(f"the exact size model takes at most {MAX_STEPS} layers of at most {MAX_WEIGHTS} "
                              "weights each")
        self.sizes = np.full(len(searched), self.options.max_bit, np.int64)
        self.step_layers = [[layer] for _, layer, _ in searched]
        self.step_macs = np.array([layer.macs for _, layer, _ in searched], np.float64)
        step_of_layer = np.full(len(layers) + 1, -1, np.int32)  # the last entry maps the -1 of non-layer nodes
        step_of_layer[[i for i, _, _ in searched]] = np.arange(len(searched))
        self.node_steps = step_of_layer[node_layers(net)]

    def action_space(self, config):
        """The environment's action space and size budget for this kind."""
        return BitWidths(self, config)

    def cost(self, counts, xp=np):
        """(size in bits,) of the policy: exact in NumPy, float32 in jax.numpy (for rewards and states)."""
        return (size_bits(self.model, counts, xp),)

    def bit_widths(self, counts):
        """Bits per quantized kernel, pinned ones included: {kernel path: bits}, in layer order."""
        bits = {**self.pinned, **dict(zip(self.leaves, np.asarray(counts).tolist()))}
        return {self.net.paths[leaf]: int(bits[leaf]) for leaf in self._layer_leaves}

    def layer_usage(self, counts):
        """Per layer: name, float bits, bits kept, pinned (for reports)."""
        bits = list(self.bit_widths(counts).values())
        return [{"name": l.name, "out": FLOAT_BITS, "kept": b, "bits": b, "pinned": leaf in self.pinned}
                for l, leaf, b in zip(self.net.layers, self._layer_leaves, bits)]

    def prepare(self, variables, calibration):
        """The arrays `mask` reads: the float variables."""
        return {"variables": variables}

    def mask(self, data, counts):
        """The variables with each searched kernel fake-quantized at counts[t] bits, pinned ones at theirs
        (pure, traceable: the bit widths are traced)."""
        leaves = list(jax.tree.leaves(data["variables"]))
        widths = [(leaf, counts[t]) for t, leaf in enumerate(self.leaves)] + list(self.pinned.items())
        for leaf, bits in widths:
            leaves[leaf] = fake_quantize(leaves[leaf], jnp.asarray(bits, jnp.float32))
        return jax.tree.unflatten(self.net.treedef, leaves)

    def masks(self, data, counts):
        """What the policy keeps, as the export reads it: {kernel path: bits} (host)."""
        return self.bit_widths(counts)

    def export(self, variables, masks):
        """The quantized network keeps its module and shapes: (module, variables on their bit grids)."""
        return self.net.module, variables
