"""FlaxLayer: a Flax linen module adapted to the `JaxLayer` protocol.

`LinenModel` turns a module and its forward method into `init_fn(rng,
inputs)` and `call_fn(params, state, rng, inputs, training)`; `FlaxLayer`
adds what is Flax-specific on top of `JaxLayer`: names without the implied
`params` collection, RNG streams, and `flax_variables`.
"""

import collections.abc

import flax
import flax.linen as nn
import jax

from keras_flax import _errors
from keras_flax import _private
from keras_flax import _variables

# Collections never held as state: what modules `sow`.
_NEVER_STATE = ("params", "intermediates")

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


def _is_sown(collection):
    """Whether a collection holds `sow` output: tuples of values."""
    leaves = jax.tree_util.tree_flatten_with_path(collection)[0]
    return bool(leaves) and all(
        any(isinstance(k, jax.tree_util.SequenceKey) for k in path)
        for path, _ in leaves
    )


class LinenModel:
    """A linen module and method as `init_fn` and `call_fn`.

    Args:
        module: the `flax.linen.Module` instance.
        method: None, a method name, or a function taking the module first.
        takes_training: whether the method takes `training`.
        variables: initial variables (`Module.init()` format) or None.
    """

    def __init__(self, module, method, takes_training, variables=None):
        self.module = module
        self.method = method
        self.takes_training = takes_training
        self.sown = set()
        self.axes = {}  # variable path -> mesh axes, from partitioning boxes
        self._rules = tuple(nn.get_logical_axis_rules())
        self.params = self.state = None
        if variables is not None:
            self.params, self.state = self.split(_checked(variables))

    def split(self, variables):
        """`Module.init` output -> `(params, state)` as `JaxLayer` holds them.

        `params` keeps its collection key (`{"params": ...}`), as
        `keras.layers.FlaxLayer` does; boxed partitioning metadata is
        unwrapped and sown collections are dropped.
        """
        variables = flax.core.unfreeze(variables)
        self.axes.update(self._partitioning(variables))
        variables = dict(nn.meta.unbox(variables))
        self.sown |= {k for k, v in variables.items() if _is_sown(v)}
        params = (
            {"params": variables["params"]} if "params" in variables else {}
        )
        state = {
            k: v
            for k, v in variables.items()
            if k not in _NEVER_STATE and k not in self.sown
        }
        return params, state

    def _partitioning(self, variables):
        """Mesh axes of each boxed variable, by path.

        Logical axis names are mapped with the box's rules, else the rules
        in force (`nn.logical_axis_rules`) when the layer was made or is
        built.
        """
        rules = tuple(nn.get_logical_axis_rules()) or self._rules
        boxes = jax.tree_util.tree_flatten_with_path(
            variables, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
        )[0]
        axes = {}
        for path, box in boxes:
            if isinstance(box, nn.LogicallyPartitioned):
                names = nn.logical_to_mesh_axes(box.names, box.rules or rules)
            elif isinstance(box, nn.Partitioned):
                names = box.names
            else:
                continue
            axes["/".join(_variables.path_parts(path))] = tuple(names)
        return axes

    def variable_metadata(self, parts):
        """`FlaxVariable` arguments: laid out after the module's
        partitioning."""
        return {"axes": self.axes.get("/".join(parts)), "mirror": None}

    def _training_kwargs(self, training):
        return {"training": training} if self.takes_training else {}

    def init(self, rng, inputs):
        variables = self.module.init(
            rng, inputs, method=self.method, **self._training_kwargs(True)
        )
        return self.split(variables)

    def apply(self, params, state, rng, inputs, training):
        outputs, mutated = self.module.apply(
            {**params, **state},
            inputs,
            rngs=rng,
            method=self.method,
            mutable=nn.DenyList([*_NEVER_STATE, *sorted(self.sown)]),
            **self._training_kwargs(training),
        )
        return outputs, {name: mutated.get(name, state[name]) for name in state}


def _checked(variables):
    if not isinstance(variables, collections.abc.Mapping) or not all(
        isinstance(v, collections.abc.Mapping) for v in variables.values()
    ):
        raise TypeError(_errors.variables_not_mapping(variables))
    bad = _variables.non_array_leaves(nn.meta.unbox(variables))
    if bad:
        raise TypeError(_errors.variables_not_arrays(bad))
    return variables


def variables_in_init_format(params, state):
    """`{"params": ..., **collections}`, as `Module.init()` returns."""
    return {**(params or {}), **(state or {})}
