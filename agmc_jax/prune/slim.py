"""Physical slimming: smaller arrays and a Linen module that runs them, for any traced module.

Linen checks that stored parameters have the shapes its layers would create, and a layer's
`features` is fixed in the module's code. `Slimmed` runs the original module with its `Conv` and
`Dense` calls intercepted and re-issued with widths read from the stored kernels; BatchNorm and
biases already take their width from the input.
"""
import contextvars
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from agmc_jax.prune.masks import _axis_keep, vectors_from_masks


_REISSUING = contextvars.ContextVar("reissuing", default=False)


def intercepted(context) -> bool:
    """Whether an intercepted call is a module's `__call__` issued by the user's code (not one of our re-issues)."""
    return not _REISSUING.get() and context.method_name == "__call__"


def reissue(module, args, kwargs, **changes):
    """Run a `Conv` or `Dense` call again as a clone whose width comes from its stored kernel, plus `changes`."""
    kernel = module.get_variable("params", "kernel")
    changes = {"features": kernel.shape[-1], **changes}
    if isinstance(module, nn.Conv):
        changes["feature_group_count"] = args[0].shape[-1] // kernel.shape[-2]
    resized = module.clone(parent=None, **changes)
    token = _REISSUING.set(True)
    try:
        return resized.apply({"params": module.variables["params"]}, *args, **kwargs)
    finally:
        _REISSUING.reset(token)


def _resized_call(next_fun, args, kwargs, context):
    if intercepted(context) and isinstance(context.module, (nn.Conv, nn.Dense)):
        return reissue(context.module, args, kwargs)
    return next_fun(*args, **kwargs)


class Slimmed(nn.Module):
    """`base` with layer widths taken from the variables it is applied to (same variable tree)."""

    base: Any

    def setup(self):
        nn.share_scope(self, self.base)

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(_resized_call):
            return self.base(*args, **kwargs)


def slim_variables(net, variables, vectors):
    """Every leaf restricted to the kept indices of each of its channel axes."""
    leaves = net.check_variables(variables)
    slimmed = []
    for leaf, maps in zip(leaves, net.axis_maps):
        array = np.asarray(leaf)
        for axis, axis_map in enumerate(maps):
            array = np.compress(_axis_keep(axis_map, vectors), array, axis=axis)
        slimmed.append(array)
    return jax.tree.unflatten(net.treedef, slimmed)


def slim(net, variables, masks):
    """(Slimmed module, smaller variables) computing what `apply_masks(variables, masks)` does."""
    net.check_variables(variables)
    vectors = vectors_from_masks(net, masks)
    masked = jax.tree.map(lambda v, m: v * m.astype(v.dtype), variables, masks)
    return Slimmed(net.module), slim_variables(net, masked, vectors)
