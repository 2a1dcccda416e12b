"""A flat program: a model's jaxpr with calls (jit, custom_jvp/vjp) inlined, over integer value ids.

Tracing analyses and re-evaluates this list; inlining makes nested calls (Linen's `relu` is a
`custom_jvp_call` around a `jit`) look like any other operation.
"""
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import core

from agmc_jax.errors import TraceError

CALL_PRIMITIVES = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                   "custom_vjp_call_jaxpr", "remat", "checkpoint", "custom_lin"}


class Constant(NamedTuple):
    """A literal or closed-over constant operand."""

    value: Any


class Op(NamedTuple):
    """One primitive application: operands are value ids or `Constant`s."""

    index: int
    primitive: Any
    params: dict
    inputs: tuple
    outputs: tuple
    where: str  # the Linen module path (name stack) that emitted the op

    @property
    def name(self) -> str:
        return self.primitive.name


class Program(NamedTuple):
    """Flat ops over value ids; `shapes[i]` is value i's shape; inputs/outputs are value ids."""

    ops: tuple
    shapes: tuple
    inputs: tuple
    outputs: tuple


def _sub_jaxpr(eqn):
    """The jaxpr a call primitive runs, and the constants it closes over."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, core.ClosedJaxpr):
            return sub.jaxpr, sub.consts
        if isinstance(sub, core.Jaxpr):
            return sub, ()
    raise TraceError(f"cannot inline {eqn.primitive.name}: no sub-jaxpr among its parameters")


def flatten(closed: core.ClosedJaxpr) -> Program:
    """Inline every call in `closed` into one list of ops."""
    ops, shapes = [], []

    def new_value(aval):
        shapes.append(tuple(getattr(aval, "shape", ())))
        return len(shapes) - 1

    def operand(env, atom):
        if isinstance(atom, core.Literal):
            return Constant(atom.val)
        return env[atom]

    def inline(jaxpr, consts, args, prefix=""):
        env = dict(zip(jaxpr.constvars, [Constant(c) for c in consts]))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            inputs = tuple(operand(env, a) for a in eqn.invars)
            where = "/".join(filter(None, (prefix, str(eqn.source_info.name_stack))))
            if eqn.primitive.name in CALL_PRIMITIVES:
                sub, sub_consts = _sub_jaxpr(eqn)
                results = inline(sub, sub_consts, inputs[len(inputs) - len(sub.invars):], where)
            else:
                results = tuple(new_value(v.aval) for v in eqn.outvars)
                ops.append(Op(len(ops), eqn.primitive, dict(eqn.params), inputs, results, where))
            env.update(zip(eqn.outvars, results))
        return tuple(operand(env, a) for a in jaxpr.outvars)

    inputs = tuple(new_value(v.aval) for v in closed.jaxpr.invars)
    outputs = inline(closed.jaxpr, closed.consts, inputs)
    return Program(tuple(ops), tuple(shapes), inputs, outputs)


def evaluate(program: Program, args, capture=()) -> tuple:
    """Run the program on `args`; returns (outputs, {value id: array} for the ids in `capture`)."""
    env = dict(zip(program.inputs, args))

    def read(x):
        return x.value if isinstance(x, Constant) else env[x]

    for op in program.ops:
        results = op.primitive.bind(*(read(x) for x in op.inputs), **op.params)
        if not op.primitive.multiple_results:
            results = (results,)
        env.update(zip(op.outputs, results))
    return tuple(read(x) for x in program.outputs), {i: env[i] for i in capture}


def abstract_like(tree):
    """ShapeDtypeStructs for every leaf of `tree` (arrays or already abstract values)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
