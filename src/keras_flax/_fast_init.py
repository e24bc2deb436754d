"""Initialisation run once, the fastest way (an optional speed path).

`run_once(init)` has `init`'s signature and results: the layer sees no
difference but the time to build (W3, 64 x Dense + LayerNorm: 3.1 s as one
program, 0.8 s op by op).
"""

import jax

from keras_flax import _private

# With more leaves than this, running op by op is faster than compiling one
# program: XLA compiles each random initialiser of the one program
# separately, while op by op compiles each distinct op once, shared by the
# identical layers that many-leaf modules are made of (64 x Dense +
# LayerNorm: 0.8 s op by op, 3.1 s as one program; a CNN with BatchNorm:
# 0.9 s vs 0.4 s).
_OP_BY_OP_LEAVES = 64


def run_once(init):
    """`init(rng, inputs)` the fastest way for a single call.

    One compiled program with the cheapest optimisation, or, for modules
    of many leaves, op by op (what `Module.init` does); the values are the
    same. Under a trace (`jax.eval_shape`), simply jitted.
    """

    def run(rng, inputs):
        jitted = jax.jit(init)
        args = (rng, inputs)
        if any(
            isinstance(leaf, jax.core.Tracer)
            for leaf in jax.tree_util.tree_leaves(args)
        ):
            return jitted(*args)
        traced = jitted.trace(*args)
        out_tree = jax.tree_util.tree_structure(traced.out_info)
        if out_tree.num_leaves > _OP_BY_OP_LEAVES:
            # The traced program, op by op: the module's Python runs once.
            leaves = _private.run_op_by_op(
                traced.jaxpr, jax.tree_util.tree_leaves(args)
            )
            return jax.tree_util.tree_unflatten(out_tree, leaves)
        return _private.compile_once(traced.lower())(*args)

    return run
