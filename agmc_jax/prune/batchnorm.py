"""BatchNorm re-estimation: a pruned network's BatchNorm statistics recomputed on a few images.

Removing channels shifts what every later BatchNorm sees, so its stored running statistics no
longer fit and a pruned ResNet scores near chance whatever the policy (EagleEye's "adaptive
BatchNorm"). One inference pass in which each BatchNorm first replaces its statistics by the mean
and variance of its input over the batch, then normalises with them as at inference.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


def _feature_axes(module, ndim):
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    return tuple(a % ndim for a in axes)


def _batch_statistics(next_fun, args, kwargs, context):
    """Method interceptor: a BatchNorm call stores its input's batch statistics, then normalises with them
    (in training mode too: the running average of a statistic with itself is that statistic)."""
    module = context.module
    if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    x = args[0]
    features = _feature_axes(module, x.ndim)
    reduced = tuple(a for a in range(x.ndim) if a not in features)
    where = kwargs.get("mask")
    mean = jnp.mean(x, reduced, where=where)
    variance = jnp.mean(jnp.square(x - jnp.expand_dims(mean, reduced)), reduced, where=where)
    stored = module.get_variable("batch_stats", "mean")
    module.put_variable("batch_stats", "mean", mean.reshape(stored.shape).astype(stored.dtype))
    module.put_variable("batch_stats", "var", variance.reshape(stored.shape).astype(stored.dtype))
    if module.use_running_average is None and len(args) < 2 and kwargs.get("use_running_average") is None:
        kwargs = {**kwargs, "use_running_average": True}
    return next_fun(*args, **kwargs)


def apply_recalibrated(module, variables, images, **call_kwargs):
    """(outputs on `images`, variables) with every BatchNorm's statistics re-estimated on `images` (pure, jittable).

    The outputs are the recalibrated network's predictions for those images, so a caller scoring them
    need not run them twice. Under `jit` with `images` sharded over devices the means are global.
    """
    if "batch_stats" not in variables:
        return module.apply(variables, images, **call_kwargs), variables
    with nn.intercept_methods(_batch_statistics):
        outputs, updates = module.apply(variables, images, mutable=["batch_stats"], **call_kwargs)
    recalibrated = {**variables, "batch_stats": updates["batch_stats"]}
    return outputs, jax.tree.unflatten(jax.tree.structure(variables), jax.tree.leaves(recalibrated))


def recalibrate(module, variables, images, **call_kwargs):
    """`variables` with every BatchNorm's statistics re-estimated on `images` (one batch; pure, jittable)."""
    if "batch_stats" not in variables:
        return variables
    return apply_recalibrated(module, variables, images, **call_kwargs)[1]
