"""Initialisation run once, the fastest way (an optional speed path).

`run_once(init)` has `init`'s signature and results: the layer sees no
difference but the time to build. Which way is fastest was measured, cold,
in fresh processes (seconds; `init`: `Module.init`, then one program or op
by op, at XLA's cheapest or default options):

    module                 values  leaves  init  cheap  op-cheap  op-default
    W1, the docs' CNN        1.1M       6   2.2    0.5       1.1           -
    W3, 64 x Dense + LN      0.1M     258   2.0    3.9       0.7           -
    12 x Dense 2048           50M      24   1.9    5.2       5.4         1.7
    96 x Dense 1024          101M     192   1.7      -         -         1.5

XLA's cheapest compilation saves compile time but runs the random
initialisers unoptimised (about 0.1 us per value against 0.015), so past a
few million values the default options win; op by op, each distinct
operation is compiled once and shared by identical layers.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.core

from keras_flax import _private
from keras_flax._model import PyTree

# With more leaves than this (and few values), op by op is faster than one
# program: XLA compiles each initialiser of the one program separately.
_OP_BY_OP_LEAVES = 64

# With more values than this, running the initialisers dominates: op by
# op with XLA's default options.
_OPTIMISED_VALUES = 2**23


def run_once(init: Callable[..., Any]) -> Callable[..., Any]:
    """`init(rng, inputs)` the fastest way for a single call.

    By the size of what it creates: op by op with XLA's default options
    for large modules, else one program compiled at the cheapest options
    or, for modules of many leaves, op by op at those options; the values
    are the same. Under a trace (`jax.eval_shape`), simply jitted.
    """

    def run(rng: Any, inputs: PyTree) -> Any:
        jitted = jax.jit(init)
        args = (rng, inputs)
        if any(
            isinstance(leaf, jax.core.Tracer)
            for leaf in jax.tree_util.tree_leaves(args)
        ):
            return jitted(*args)
        traced = jitted.trace(*args)
        out_tree = jax.tree_util.tree_structure(traced.out_info)
        values = sum(
            math.prod(leaf.shape)
            for leaf in jax.tree_util.tree_leaves(traced.out_info)
        )
        large = values > _OPTIMISED_VALUES
        if large or out_tree.num_leaves > _OP_BY_OP_LEAVES:
            # The traced program, op by op: the module's Python runs once.
            leaves = _private.run_op_by_op(
                traced.jaxpr,
                jax.tree_util.tree_leaves(args),
                cheapest=not large,
            )
            return jax.tree_util.tree_unflatten(out_tree, leaves)
        return _private.compile_once(traced.lower())(*args)

    return run
