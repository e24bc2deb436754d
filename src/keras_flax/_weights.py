"""What a layer holds: its model's weights, as one value.

`plan` decides it from the model, the input spec and the given trees: the
arrays (given, or made by `model.init`), the parameters that do not train
and the given leaves the model does not use. `Weights` holds a plan's
arrays as Keras variables, in two `_variables.VariableTree`s (`params` and
`state`; the empty tree where there is none), and reads, assigns, saves
and loads them. How the leaves sit in variables (one each, or packed) is
the trees' `Storage`.
"""

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Mapping
from typing import Any

import jax
import keras
import numpy as np

from keras_flax import _backends
from keras_flax import _checks
from keras_flax import _inputs
from keras_flax import _layouts
from keras_flax import _packing
from keras_flax import _user_code
from keras_flax import _variables
from keras_flax._model import Axes
from keras_flax._model import Model
from keras_flax._model import PyTree

# Given leaves `init` does not create, by the tree holding them
# ("params", "state"): path -> (shape, dtype).
Unused = dict[str, dict[str, tuple[tuple[int, ...], Any]]]


def no_unused() -> Unused:
    """No unused leaves."""
    return {"params": {}, "state": {}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What a layer is to hold.

    Attributes:
        params: the parameters, a PyTree of arrays (None for none).
        state: the state, a PyTree of arrays (None for none).
        frozen: the paths of the parameters that do not train (`wrt` left
            them out, or the model does not use them).
        unused: the given leaves the model does not use (kept, frozen).
        axes: Flax partitioning axes by path text.
        spec: the input specs the plan is for (sizes found, if searched).
        copy: whether the variables copy the arrays (the user keeps them).
    """

    params: Any
    state: Any
    frozen: frozenset[str]
    unused: Unused
    axes: Mapping[str, Any]
    spec: _inputs.Specs | None
    copy: bool


def unused_config(unused: Unused) -> dict[str, Any]:
    """`unused` as a layer's build config holds it (JSON)."""
    return {
        which: {
            path: [list(shape), jax.numpy.dtype(dtype).name]
            for path, (shape, dtype) in leaves.items()
        }
        for which, leaves in unused.items()
    }


def unused_from_config(config: dict[str, Any]) -> Unused:
    """The unused leaves a build config holds (`unused_config`)."""
    return {
        which: {
            path: (tuple(shape), dtype)
            for path, (shape, dtype) in leaves.items()
        }
        for which, leaves in config.items()
    }


def given(
    model: Model,
    params: Any,
    state: Any,
    left_out: Callable[[Any], frozenset[str]],
) -> Plan:
    """The plan for the trees given at construction, before any input is
    seen: nothing checked yet, the parameters `wrt` leaves out frozen.
    Arrays the user passed are copied once; an NNX module's own arrays are
    shared with it (one copy of each weight)."""
    return Plan(
        params=params,
        state=state,
        frozen=left_out(params) if params is not None else frozenset(),
        unused=no_unused(),
        axes=dict(model.axes),
        spec=None,
        copy=model.live is None,
    )


def plan(
    model: Model,
    spec: _inputs.Specs,
    trees: tuple[Any, Any],
    *,
    seed: int | None,
    layer_name: str,
    axes: Mapping[str, Any],
    left_out: Callable[[Any], frozenset[str]],
    saved_unused: Unused,
) -> Plan:
    """What a layer holds once built for inputs of `spec`.

    Args:
        model: the `Model`.
        spec: the input specs.
        trees: `(params, state)` given (arrays, or their shapes); both None
            where the model's `init` is to make them.
        seed: the seed of `init`'s RNG.
        layer_name: the layer's name, for messages.
        axes: the Flax partitioning axes known so far, by path text.
        left_out: the paths of a parameter tree `wrt` does not train.
        saved_unused: unused leaves a saved layer had (the weights file
            fills them).
    """
    if all(tree is None for tree in trees) and model.init is not None:

        def init(
            inputs: PyTree,
        ) -> tuple[Any, Any, Mapping[str, tuple[str | None, ...]]]:
            return initialize(model, seed, layer_name, axes, inputs)

        (params, state, init_axes), spec = _inputs.search(
            init, spec, model.diagnostics.initializer
        )
        frozen = left_out(params) | set(saved_unused["params"])
        return Plan(
            params=_variables.with_leaves(params, saved_unused["params"]),
            state=_variables.with_leaves(state, saved_unused["state"]),
            frozen=frozenset(frozen),
            unused=saved_unused,
            axes={**axes, **init_axes},
            spec=spec,
            copy=False,
        )
    params, state = trees
    unused = _check_given(model, spec, trees, seed, layer_name, axes)
    frozen = left_out(params) if params is not None else frozenset()
    return Plan(
        params=params,
        state=state,
        frozen=frozenset(frozen | set(unused["params"])),
        unused=unused,
        axes=axes,
        spec=spec,
        copy=model.live is None,
    )


def initialize(
    model: Model,
    seed: int | None,
    layer_name: str,
    axes: Mapping[str, Any],
    inputs: Any,
) -> tuple[Any, Any, Axes]:
    """`(params, state, axes)` made by `model.init` at `inputs`
    (placeholders); under a distribution that shards weights, each made in
    its shards."""
    init, rng_of = model.init, model.rng.init
    assert init is not None and rng_of is not None  # built by `init`
    rng = rng_of(seed)
    if keras.distribution.distribution() is not None:
        *shapes, init_axes = _shapes(init, rng, inputs)
        shardings = _layouts.init_shardings(
            layer_name, shapes, model.names, {**axes, **init_axes}
        )
        if shardings is not None:
            sharded = _layouts.sharded_init(
                lambda rng, x: init(rng, x)[:2], shardings
            )
            return (*sharded(rng, inputs), init_axes)
    return init(rng, inputs)


def _shapes(init: Any, rng: Any, inputs: PyTree) -> tuple[Any, Any, Axes]:
    """`init`'s `(params, state, axes)`, the trees as shapes (traced
    abstractly; the axes are data, which a trace does not return)."""
    axes: dict[str, Any] = {}

    def trees(rng: Any, inputs: PyTree) -> tuple[Any, Any]:
        params, state, found = init(rng, inputs)
        axes.update(found)
        return params, state

    return (*jax.eval_shape(trees, rng, inputs), axes)


def _check_given(
    model: Model, spec: Any, trees: Any, seed: Any, layer_name: str, axes: Any
) -> Unused:
    """Compares the given trees with what `init` creates.

    Missing or mis-shaped leaves are refused. Returns
    the given leaves that `init` does not create (a pretrained model's
    head, used through another method): they are kept, the parameters
    frozen, as Flax's `apply` accepts them. With unknown sizes only the
    paths are compared, at the first sizes the model accepts.
    """
    if model.init is None:
        return no_unused()  # nothing to compare with
    sizes_known = not _inputs.has_unknown(spec, skip_batch=True)

    def expected_shapes(inputs: PyTree) -> Any:
        return jax.eval_shape(
            lambda: initialize(model, seed, layer_name, axes, inputs)[:2]
        )

    if sizes_known:
        expected = _user_code.attempt(
            expected_shapes, _inputs.placeholders(spec, 1)
        )
    else:
        expected, _ = _inputs.search(expected_shapes, spec, "inputs")
    if isinstance(expected, _user_code.Refused):
        return no_unused()  # the call raises the model's error
    return _checks.unused_leaves(model, trees, expected, spec, sizes_known)


def forward(
    model: Model,
    weights: "Weights",
    param_values: Any,
    state_values: Any,
    seed: Any,
    inputs: PyTree,
    training: bool,
) -> tuple[PyTree, list[Any] | None]:
    """The pure forward pass, jitted once per input signature.

    Returns the outputs and the new state values in leaf order, with
    `None` for leaves the call left unchanged (not written back).
    """
    params_tree, tree = weights.params, weights.state
    state_leaves = tree.leaves(state_values)
    params = params_tree.rebuild(param_values)
    state = tree.unflatten_leaves(state_leaves)
    given = tree.treedef.flatten_up_to(state)
    call_rng = model.rng.call
    rng = None
    if call_rng is not None:
        rng = call_rng(_backends.key_data(seed))
    outputs, new_state = model.apply(params, state, rng, inputs, training)
    if tree.holds_nothing:
        # No state held (`state=None`, or `init_fn` returned none):
        # the outputs, as `keras.layers.JaxLayer` returns them.
        _checks.no_state("call_fn", new_state)
        return outputs, None
    _checks.state_structure("call_fn", new_state, tree)
    new_leaves = tree.leaves_of(new_state, given)
    return outputs, tree.updates(new_leaves, state_leaves)


class Weights:
    """A layer's weights: `params` (trainable, but those frozen) and `state`
    (non-trainable), each a `_variables.VariableTree`, with what their plan
    decided.

    Attributes:
        params: the parameters' `VariableTree`.
        state: the state's `VariableTree`.
        spec: the input specs the layer was built for (None before build).
        axes: Flax partitioning axes by path text, as known so far.
        unused: the given leaves the model does not use (kept, frozen); a
            saved layer's build config sets them before build.
        given: `(params, state)` given at construction and waiting for
            build to be laid out (packing needs to know which leaves
            train); None where there are none, or variables hold them.
    """

    def __init__(
        self,
        params: _variables.VariableTree,
        state: _variables.VariableTree,
        *,
        spec: _inputs.Specs | None,
        axes: Mapping[str, Any],
        unused: Unused,
        given: tuple[Any, Any] | None = None,
    ) -> None:
        self.params = params
        self.state = state
        self._trees = (params, state)
        self.spec = spec
        self.axes = dict(axes)
        self.unused = unused
        self.given = given

    @classmethod
    def empty(
        cls,
        layer: Any,
        axes: Mapping[str, Any] | None = None,
        given: tuple[Any, Any] | None = None,
    ) -> "Weights":
        """Weights holding nothing yet (before build), with the axes known
        (none by default); `given` trees wait for build."""
        return cls(
            _variables.VariableTree(layer, None, True, lambda parts: parts),
            _variables.VariableTree(layer, None, False, lambda parts: parts),
            spec=None,
            axes=axes or {},
            unused=no_unused(),
            given=given,
        )

    @classmethod
    def create(
        cls,
        layer: Any,
        model: Model,
        plan: Plan,
        *,
        packed: bool,
        float_dtype: Callable[[Any], Any],
    ) -> "Weights":
        """The variables of `plan` in `layer`: one per leaf, or the small
        leaves of each dtype packed (`_packing`)."""
        if packed and (plan.params is not None or plan.state is not None):
            _checks.packing_allowed()
        user_format = model.user_format
        write_back = None if user_format is None else user_format.write_back

        def tree(
            values: Any, trainable: bool, frozen: Collection[str] = ()
        ) -> _variables.VariableTree:
            def metadata(parts: tuple[str, ...]) -> dict[str, Any]:
                return {
                    "axes": plan.axes.get(_variables.path_text(parts)),
                    "mirror": None if write_back is None else write_back(parts),
                }

            return _variables.VariableTree(
                layer,
                values,
                trainable=trainable,
                name_fn=lambda parts: model.names(trainable, parts),
                autocast=trainable,
                metadata_fn=metadata,
                frozen=frozen,
                float_dtype=float_dtype,
                copy=plan.copy,
                storage=_packing.Packed if packed else _variables.Plain,
            )

        weights = cls(
            tree(plan.params, True, plan.frozen),
            tree(plan.state, False),
            spec=plan.spec,
            axes=plan.axes,
            unused=plan.unused,
        )
        _layouts.warn_unmatched(layer.name, [v.path for v in weights.variables])
        return weights

    @property
    def holds_nothing(self) -> bool:
        """Whether neither tree was given or created."""
        return all(tree.holds_nothing for tree in self._trees)

    @property
    def variables(self) -> list[Any]:
        """Every Keras variable, parameters then state."""
        return [v for tree in self._trees for v in tree.variables]

    def build_config(self) -> dict[str, Any]:
        """A layer's build config entries for these weights: the input
        dtypes, and the given leaves the model does not use."""
        config: dict[str, Any] = {}
        if self.spec is not None:
            config["input_dtypes"] = self.spec.dtype_names()
        if any(self.unused.values()):
            config["unused_leaves"] = unused_config(self.unused)
        return config

    def to_plan(self) -> tuple[Any, Any]:
        """The `(params, state)` a build plans from: the given trees, both
        None where `init` is to make them, or the shapes of those held."""
        if self.given is not None:
            return self.given
        if self.holds_nothing:
            return None, None
        return self.shapes()

    def built(self, plan: Plan) -> None:
        """Takes what `plan` (made for the weights held) decided: the
        parameters it freezes, the input specs, axes and unused leaves."""
        self.params.freeze(plan.frozen)
        self.spec = plan.spec
        self.axes = dict(plan.axes)
        self.unused = plan.unused

    def trees(self) -> tuple[Any, Any]:
        """`(params, state)` with what holds each leaf at its place."""
        return self.params.tree, self.state.tree

    def current_values(self, copy: bool = True) -> tuple[Any, Any]:
        """`(params, state)`: the current values (copies), as trees."""
        return tuple(
            tree.rebuild([_copy(v) if copy else v for v in tree.values()])
            for tree in self._trees
        )  # pyright: ignore[reportReturnType]

    def shapes(self) -> tuple[Any, Any]:
        """`(params, state)` of the current values, traced only: JAX arrays
        as they are, another backend's as their shapes."""
        return jax.tree_util.tree_map(_spec_of, self.current_values(copy=False))

    def leaf_sizes(self) -> list[tuple[bool, tuple[str, ...], int, bool]]:
        """`(in params, path parts, size, trains)` of every array leaf,
        parameters then state."""
        return [
            (tree is self.params, parts, math.prod(shape), trains)
            for tree in self._trees
            for parts, (shape, _), trains in zip(
                tree.keys, tree.leaf_specs(), tree.trains(), strict=True
            )
        ]

    def by_name(self, rng_state: Collection[str]) -> tuple[dict, dict]:
        """What holds each weight, by its name inside the layer (the Flax
        path, `Dense_0/kernel`, `batch_stats/BatchNorm_0/mean`): a Keras
        variable, or a packed leaf's view; `(params, state)`, two dicts.
        The names in `rng_state` (RNG state) are left out."""
        return tuple(
            {
                name: holder
                for name, holder in zip(tree.names, tree.holders(), strict=True)
                if name not in rng_state
            }
            for tree in self._trees
        )  # pyright: ignore[reportReturnType]

    def write_back(self) -> None:
        """Copies every current value into the user's object, where the
        model writes back (an NNX module); not inside traced computations.
        """
        if not all(_backends.is_concrete(v.value) for v in self.variables):
            return
        for tree in self._trees:
            tree.mirror_values()

    def assign_user(
        self, layer_name: str, model: Model, variables: Any
    ) -> None:
        """Assigns every value of `variables` (the model's own format);
        all are checked first, and on a misfit nothing changes."""
        if self.holds_nothing:
            raise ValueError(assigned_before_build(layer_name))
        user_format = model.user_format
        assert user_format is not None  # only layers of such kinds assign
        given = _variables.by_path(user_format.from_user(variables))
        held = {}
        for tree in self._trees:
            held.update(_variables.by_path(user_format.view(tree.tree)))
        _checks.assignable(layer_name, given, held)
        for path, variable in held.items():
            # A copy: `fit` donates the variables' buffers, and the given
            # arrays stay the user's.
            value = _copy(_variables.key_data(given[path]))
            variable.assign(_backends.initial_value(value))
        self.write_back()

    def specs(self, cast_to: str | None) -> tuple[list, list]:
        """`ShapeDtypeStruct`s of the values a call reads, `(params,
        state)`: floats of the parameters cast to `cast_to` (None: not
        cast), as Keras autocasts them."""
        return _specs(self.params, cast_to), _specs(self.state, None)

    def leaf_values(self) -> list[np.ndarray]:
        """Every leaf's value, parameters then state, in leaf order (the
        same however the leaves are held)."""
        values = []
        for tree in self._trees:
            arrays = [keras.ops.convert_to_numpy(v) for v in tree.values()]
            values.extend(tree.leaves(arrays))
        return values

    def load(self, layer_name: str, store: Any) -> None:
        """Assigns the leaf values of `store` (`leaf_values`' order)."""
        specs = [spec for tree in self._trees for spec in tree.leaf_specs()]
        if len(store.keys()) != len(specs):
            raise ValueError(
                weights_count_mismatch(
                    layer_name, len(specs), len(store.keys())
                )
            )
        arrays = iter(np.asarray(store[str(i)]) for i in range(len(specs)))
        for tree in self._trees:
            leaves = [next(arrays) for _ in tree.leaf_specs()]
            values = tree.updates(leaves, [None] * len(leaves))
            tree.assign([np.asarray(v) for v in values])


def weights_count_mismatch(
    layer_name: str, expected: Any, received: Any
) -> str:
    return (
        f"The weights file for layer '{layer_name}' must hold one array per "
        f"leaf of the model: {expected}. Received: {received} arrays. Load "
        "a file saved from a layer wrapping the same model (packed or not)."
    )


def assigned_before_build(layer_name: str) -> str:
    return (
        f"`flax_variables` of layer '{layer_name}' cannot be assigned before "
        "its weights exist. Received: an assignment to a layer not yet "
        "built. Call the layer on inputs first (or `model.build(...)`), or "
        "pass the variables at construction: `FlaxLayer(module, "
        "variables=...)`."
    )


def _spec_of(value: Any) -> Any:
    """A JAX array as it is, another backend's tensor as its shape."""
    if isinstance(value, jax.Array):
        return value
    dtype = keras.backend.standardize_dtype(value.dtype)
    return jax.ShapeDtypeStruct(tuple(value.shape), dtype)


def owned(value: Any) -> Any:
    """`value`, copied where it is a JAX array: every compiled step
    donates the variables' buffers, and the given arrays stay the user's."""
    if isinstance(value, jax.Array):
        return jax.numpy.array(value, copy=True)
    return value


def _copy(value: Any) -> Any:
    return jax.numpy.array(_backends.to_jax(value), copy=True)


def _specs(tree: PyTree, cast_to: str | None) -> list[Any]:
    """`ShapeDtypeStruct`s of the variables of `tree` (packed or not),
    floats cast to `cast_to` (None: not cast)."""

    def spec(variable: Any) -> Any:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        floating = jax.numpy.issubdtype(dtype, jax.numpy.floating)
        if floating and cast_to is not None:
            dtype = cast_to
        return jax.ShapeDtypeStruct(tuple(variable.shape), dtype)

    return [spec(v) for v in tree.variables]


def policy_given(dtype: Any) -> bool:
    """Whether a layer made with `dtype` decides its float storage by a
    dtype policy (else the module's own float dtypes are kept): one given,
    or a global one other than the default. A quantized policy from
    `float32` (what a layer without one is quantized to) counts as none."""
    if dtype is None:
        return keras.config.dtype_policy().name != "float32"
    policy = keras.dtype_policies.get(dtype)
    if policy.quantization_mode is not None:
        return not policy.name.endswith("_from_float32")
    return True
