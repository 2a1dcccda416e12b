"""Information dropout (Achille & Soatto 2018) as a channel criterion and as element-wise pruning.

Every traced layer whose input channels belong to channel groups reads its input times log-normal
noise, eps ~ logNormal(0, alpha^2), with one learned alpha per input channel bounded by `alpha_max`
(alpha = alpha_max * sigmoid(rho)). The noise sits on what the next layer reads (after BatchNorm,
activation and pooling), the representation z = f(x) * eps of the paper. The loss adds
beta * KL(p(z|x) || p(z)) with A&S's closed form for ReLU networks: with the scale-invariant
log-uniform prior the KL of a unit is -log alpha + const. We charge it on every unit, not only the
active ones, so that a channel the next layer ignores, or that is dead, has nothing pulling its alpha
down and reaches the bound: channels whose noise leaves them carrying no information rank last. (The
softplus / log-normal-prior form needs positive activations; most zoo networks feed signed or ReLU
values.)

The criterion `infodrop` learns the alphas of a trained network on the calibration images (the
network's weights frozen, its own predictions as targets: no labels needed, as AMC's least squares)
and scores channel u of a group by the information it passes, its share of the KL term: the sum
over the units that read it of -log alpha. After the per-layer rates are chosen, weights are pruned
element-wise by |w| times the signal-to-noise ratio of the channel they read (`weight_importance`).
The alphas live in their own param subtree `infodrop`, next to the wrapped network's unchanged
variables, so `agmc_jax.train.train` can also train the wrapped network, weights and noise together.
"""
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from agmc_jax.errors import MaskError
from agmc_jax.prune.masks import register_criterion
from agmc_jax.train import LOSSES

NAME = "infodrop"  # the param subtree of the alphas' logits and the batch_stats entry of the noise key


class InfoDropConfig(NamedTuple):
    """The noise, the KL weight and the short phase that learns the alphas. Measured on LeNet-5 and ResNet-20
    (Fashion-MNIST), uniform channel pruning: beta 1e-5 ranked better than 1e-4, 1e-3 (most alphas at the
    bound) and 1e-6; 100 steps as well as 400; batches of 32 ranked less steadily across seeds."""

    alpha_max: float = 0.7  # Achille & Soatto's bound on the noise scale
    alpha_init: float = 0.35  # the middle of (0, alpha_max): rho = 0
    beta: float = 1e-5  # weight of the KL term (per example, summed over units)
    steps: int = 100
    batch_size: int = 64
    learning_rate: float = 0.05  # Adam, on the alphas' logits
    seed: int = 0


class Site(NamedTuple):
    """A layer that reads noisy inputs: its module path, and per input feature the alpha it uses (-1: none)."""

    name: str
    path: tuple
    slots: tuple  # per index of the layer's input features
    groups: tuple  # per alpha: the channel group and unit it scales
    units: tuple
    positions: int  # spatial positions per example of the layer's input


def noise_sites(net) -> tuple:
    """The sites of a traced network: every layer with an input channel that belongs to a channel group."""
    sites = []
    for layer, op in zip(net.layers, net.analysis.layers):
        in_map = net.axis_maps[op.leaf][op.out_axis if op.kind == "depthwise" else op.in_axis]
        noisy = in_map.group >= 0
        if not noisy.any():
            continue
        pairs, slots = np.unique(np.stack([in_map.group[noisy], in_map.unit[noisy]], 1), axis=0, return_inverse=True)
        full = np.full(len(in_map.group), -1)
        full[noisy] = slots.ravel()
        shape = net.program.shapes[net.program.ops[op.op_index].inputs[0]]
        sites.append(Site(layer.name, tuple(layer.kernel_path[1:-1]), tuple(full.tolist()),
                          tuple(pairs[:, 0].tolist()), tuple(pairs[:, 1].tolist()), int(np.prod(shape[1:-1]))))
    return tuple(sites)


def noise_scale(rho, alpha_max):
    """alpha = alpha_max * sigmoid(rho): the noise's log-scale, bounded as A&S bound it."""
    return alpha_max * jax.nn.sigmoid(rho)


def unit_alphas(alpha, slots):
    """Per input feature, the alpha of its channel; 0 (no noise) where `slots` is -1."""
    slots = jnp.asarray(slots)
    return jnp.where(slots >= 0, alpha[jnp.maximum(slots, 0)], 0.0)


def site_kl(alpha, slots, positions):
    """A site's KL per example under the log-uniform prior: sum over its noisy units of -log alpha."""
    slots = jnp.asarray(slots)
    return positions * jnp.sum(jnp.where(slots >= 0, -jnp.log(alpha[jnp.maximum(slots, 0)]), 0.0))


def initial_logits(sites, config: InfoDropConfig):
    """The alphas' logits rho, nested by site path, all at `alpha_init`."""
    rho = float(np.log(config.alpha_init / (config.alpha_max - config.alpha_init)))
    return unflatten_dict({s.path: jnp.full(len(s.groups), rho, jnp.float32) for s in sites})


def initial_key(config: InfoDropConfig):
    """The noise key's raw data, as the wrapper keeps it in `batch_stats`."""
    return jax.random.key_data(jax.random.key(config.seed))


class InfoDropout(nn.Module):
    """A network whose sites read their inputs times eps ~ logNormal(0, alpha^2); noise on when `noise` (default:
    `train`), then beta * KL is sown into `LOSSES`. The wrapped network's variables keep their paths; the noise
    key is state in `batch_stats`, so `agmc_jax.train.train_step` (which passes no rngs) advances it."""

    module: nn.Module
    sites: tuple
    eval_kwargs: tuple  # the wrapped module's inference keywords; `train` among them follows the wrapper's
    config: InfoDropConfig = InfoDropConfig()

    def setup(self):
        nn.share_scope(self, self.module)
        self.rho = self.param(NAME, lambda _: initial_logits(self.sites, self.config))
        self.noise_key = self.variable("batch_stats", NAME, lambda: initial_key(self.config))

    def __call__(self, x, train: bool = False, noise: bool | None = None):
        kwargs = dict(self.eval_kwargs)
        if "train" in kwargs:
            kwargs["train"] = train
        if not (train if noise is None else noise):
            return self.module(x, **kwargs)
        key, following = jax.random.split(jax.random.wrap_key_data(self.noise_key.value))
        self.noise_key.value = jax.random.key_data(following)
        sites, rho, kl = {s.path: s for s in self.sites}, flatten_dict(self.rho), []

        def noisy_inputs(next_fun, args, call_kwargs, context):
            site = sites.get(tuple(context.module.path)) if context.method_name == "__call__" else None
            if site is None:
                return next_fun(*args, **call_kwargs)
            inputs = args[0]
            if inputs.shape[-1] != len(site.slots):
                raise MaskError(f"layer {site.name} reads {inputs.shape[-1]} features, its kernel {len(site.slots)}: "
                                "information dropout needs channels-last inputs")
            alpha = noise_scale(rho[site.path], self.config.alpha_max)
            normal = jax.random.normal(jax.random.fold_in(key, len(kl)), inputs.shape, inputs.dtype)
            kl.append(site_kl(alpha, site.slots, int(np.prod(inputs.shape[1:-1]))))
            return next_fun(inputs * jnp.exp(unit_alphas(alpha, site.slots) * normal), *args[1:], **call_kwargs)

        with nn.intercept_methods(noisy_inputs):
            outputs = self.module(x, **kwargs)
        self.sow(LOSSES, NAME, self.config.beta * sum(kl))
        return outputs


def information_dropout(net, variables, config: InfoDropConfig = InfoDropConfig()):
    """(`InfoDropout` module, variables) of the traced network `net`: its variables unchanged, plus the alphas'
    logits at `alpha_init` (params/infodrop, nested by layer path) and the noise key (batch_stats/infodrop)."""
    net.check_variables(variables)
    if not 0 < config.alpha_init < config.alpha_max:
        raise MaskError(f"need 0 < alpha_init < alpha_max, got {config.alpha_init} and {config.alpha_max}")
    if NAME in variables.get("params", {}) or NAME in variables.get("batch_stats", {}):
        raise MaskError(f"the variables already hold {NAME!r}: the network is wrapped already, or has a module of "
                        "that name; rename it")
    sites = noise_sites(net)
    module = InfoDropout(net.module, sites, tuple(sorted(net.call_kwargs.items())), config)
    params = {**variables["params"], NAME: initial_logits(sites, config)}
    state = {**variables.get("batch_stats", {}), NAME: initial_key(config)}
    return module, {**variables, "params": params, "batch_stats": state}


def split_variables(variables):
    """(the wrapped network's own variables, the alphas' logits) of information-dropout variables."""
    params = dict(variables["params"])
    rho = params.pop(NAME)
    state = {k: v for k, v in variables.get("batch_stats", {}).items() if k != NAME}
    own = {**variables, "params": params, "batch_stats": state}
    return (own if state else {k: v for k, v in own.items() if k != "batch_stats"}), rho


def layer_alphas(net, rho, alpha_max):
    """Per site layer name: the alpha of each of its input features (0 where the input carries no noise)."""
    rho = flatten_dict(rho)
    return {s.name: np.asarray(unit_alphas(noise_scale(rho[s.path], alpha_max), s.slots)) for s in noise_sites(net)}


@partial(jax.jit, static_argnums=(0, 4))
def _fit_logits(module, variables, images, targets, config):
    """The alphas' logits after `config.steps` Adam steps on cross-entropy to `targets` plus beta * KL, the
    network's own variables frozen, BatchNorm in inference mode (one compiled scan)."""
    optimizer, batch = optax.adam(config.learning_rate), min(config.batch_size, images.shape[0])

    def loss(rho, state, x, t):
        noisy = {**variables, "params": {**variables["params"], NAME: rho}, "batch_stats": state}
        logits, updates = module.apply(noisy, x, noise=True, mutable=["batch_stats", LOSSES])
        kl = sum(jnp.sum(term) for term in jax.tree.leaves(updates[LOSSES]))
        return optax.softmax_cross_entropy(logits, t).mean() + kl, updates["batch_stats"]

    def step(carry, key):
        rho, opt_state, state = carry
        chosen = jax.random.choice(key, images.shape[0], (batch,), replace=False)
        (_, state), grads = jax.value_and_grad(loss, has_aux=True)(rho, state, images[chosen], targets[chosen])
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(rho, updates), opt_state, state), None

    rho = variables["params"][NAME]
    keys = jax.random.split(jax.random.key(config.seed), config.steps)
    return jax.lax.scan(step, (rho, optimizer.init(rho), variables["batch_stats"]), keys)[0][0]


def fit_alphas(net, variables, images, config: InfoDropConfig = InfoDropConfig()):
    """Per site layer name, its input features' alphas learned on `images` with the trained network frozen: the
    targets are the network's own predictions, so any calibration images serve, without labels."""
    if images is None or len(images) == 0:
        raise MaskError("criterion infodrop learns its noise on calibration images; pass some")
    module, wrapped = information_dropout(net, variables, config)
    images = jnp.asarray(images, jnp.float32)
    targets = jax.nn.softmax(net.module.apply(variables, images, **net.call_kwargs))
    return layer_alphas(net, _fit_logits(module, wrapped, images, targets, config), config.alpha_max)


def channel_information(net, alphas):
    """Per group, per channel: the information it passes, sum over its sites' units of -log alpha (the KL term's
    share of the channel, up to a constant); 0 for a channel no layer reads with noise."""
    scores = [np.zeros(size) for size in net.group_sizes]
    for site in noise_sites(net):
        slots = np.asarray(site.slots)
        noisy = slots >= 0
        info = -site.positions * np.log(np.asarray(alphas[site.name], np.float64)[noisy])
        groups, units = np.asarray(site.groups)[slots[noisy]], np.asarray(site.units)[slots[noisy]]
        for g in np.unique(groups):
            np.add.at(scores[g], units[groups == g], info[groups == g])
    return scores


def infodrop_importance(net, variables, calibration, config: InfoDropConfig = InfoDropConfig()):
    """The `infodrop` criterion: alphas learned on the calibration images, then each channel's information."""
    return channel_information(net, fit_alphas(net, variables, calibration, config))


def weight_importance(net, variables, alphas):
    """Per layer of `net.layers`, an array shaped like its kernel: |w| times the signal-to-noise ratio of the input
    channel it reads, 1 / sqrt(exp(alpha^2) - 1) (a weight on a channel that carries no information goes first).
    Inputs without noise count as the layer's least noisy channel; a layer without noise ranks by |w| alone."""
    leaves = net.check_variables(variables)
    importance = []
    for layer, op in zip(net.layers, net.analysis.layers):
        w = np.abs(np.asarray(leaves[op.leaf], np.float64))
        if layer.name not in alphas:
            importance.append(w)
            continue
        alpha = np.asarray(alphas[layer.name], np.float64)
        alpha = np.where(alpha > 0, alpha, alpha[alpha > 0].min())
        view = [1] * w.ndim
        view[op.out_axis if op.kind == "depthwise" else op.in_axis] = -1
        importance.append(w / np.sqrt(np.expm1(alpha ** 2)).reshape(view))
    return importance


register_criterion(NAME, infodrop_importance)
