"""PyTrees of arrays <-> Keras variables.

A `VariableTree` holds one PyTree (the `params` or the `state` of a model)
as Keras variables named after their PyTree path, so that
`variables["params"]["Dense_0"]["kernel"]` becomes a variable whose `.path`
ends in `Dense_0/kernel`: `keras.distribution.LayoutMap` keys and
`model.summary()` see Flax names. Leaves that are not arrays or numbers
(configuration) stay in the tree as they are.
"""

import contextlib

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import _backends
from keras_flax import _errors


def is_array_leaf(value):
    return isinstance(
        value, (jax.Array, np.ndarray, np.generic, bool, int, float)
    )


def path_parts(keypath):
    """Name parts of a `jax.tree_util` key path, as Keras scope names."""
    parts = []
    for key in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                text = str(getattr(key, attr))
                break
        else:
            text = str(key)
        parts.extend(part for part in text.split("/") if part)
    return tuple(parts)


def path_text(parts):
    return "/".join(parts) if parts else "(root)"


def _is_typed_key(value):
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(
        dtype, jax.dtypes.prng_key
    )


class VariableTree:
    """A PyTree whose array leaves are Keras variables of one layer.

    Attributes:
        tree: the PyTree with `keras.Variable` leaves (and static leaves).
        variables: the Keras variables, in PyTree leaf order.
        names: the path of each variable inside the tree, as a string.
    """

    def __init__(
        self, layer, values, trainable, name_fn, autocast=True, factory_fn=None
    ):
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(values)
        self._static = []
        self._key_impls = []
        self.variables = []
        self.names = []
        for keypath, leaf in leaves:
            if not (is_array_leaf(leaf) or _is_typed_key(leaf)):
                self._static.append(leaf)
                continue
            parts = name_fn(path_parts(keypath))
            self._static.append(_VARIABLE)
            self._key_impls.append(
                jax.random.key_impl(leaf) if _is_typed_key(leaf) else None
            )
            factory = factory_fn(path_parts(keypath)) if factory_fn else None
            self.variables.append(
                _new_variable(layer, parts, leaf, trainable, autocast, factory)
            )
            self.names.append(path_text(parts))
        self.tree = self._unflatten(self.variables)

    def values(self):
        """The current values of the variables, in leaf order."""
        return [variable.value for variable in self.variables]

    def rebuild(self, values):
        """The PyTree with `values` in place of the variables.

        Key data held for typed PRNG keys is wrapped back into keys.
        """
        return self._unflatten(
            jax.random.wrap_key_data(v, impl=impl) if impl else v
            for v, impl in zip(values, self._key_impls)
        )

    def _unflatten(self, values):
        values = iter(values)
        leaves = [next(values) if s is _VARIABLE else s for s in self._static]
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def leaves_of(self, tree):
        """The leaves of `tree` (same structure) at the variables' places.

        `None` at a variable's place stays `None`: it marks a leaf that a
        call left unchanged.
        """
        leaves = self._treedef.flatten_up_to(tree)
        return [
            _key_data(leaf)
            for leaf, s in zip(leaves, self._static)
            if s is _VARIABLE
        ]

    def assign(self, values):
        """Assigns `values` (leaf order, `None` to skip) to the variables."""
        for variable, value in zip(self.variables, values):
            if value is not None:
                variable.assign(value)

    @property
    def treedef(self):
        return self._treedef


_VARIABLE = object()


def _key_data(value):
    if value is not None and _is_typed_key(value):
        return jax.random.key_data(value)
    return value


def _new_variable(layer, parts, value, trainable, autocast, factory=None):
    """Creates a variable named `parts` in the layer's scope and tracks it.

    `Layer.add_weight` takes a single name, so the scopes for the Flax path
    are opened here, inside the layer's own scope.
    """
    if _is_typed_key(value):
        value = jax.random.key_data(value)
    dtype = getattr(value, "dtype", None)
    dtype = np.asarray(value).dtype if dtype is None else dtype
    if jnp.issubdtype(dtype, jnp.floating):
        dtype = layer.variable_dtype
    else:
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    # A copy: arrays the user passed stay valid when Keras donates the
    # variables' buffers to a jitted train step.
    initial = jnp.array(value, dtype=dtype, copy=True)
    initial = _backends.initial_value(initial)
    parts = parts or ("params" if trainable else "state",)
    with contextlib.ExitStack() as scopes:
        scopes.enter_context(keras.name_scope(layer.name, caller=layer))
        for part in parts[:-1]:
            scopes.enter_context(keras.name_scope(part))
        variable = (factory or keras.Variable)(
            initializer=initial,
            dtype=dtype,
            trainable=trainable,
            autocast=autocast and jnp.issubdtype(dtype, jnp.floating),
            name=parts[-1],
        )
    layer._track_variable(variable)
    return variable


def shape_struct(value):
    """`jax.ShapeDtypeStruct` of an array-like leaf, or the leaf itself."""
    if _is_typed_key(value):
        value = jax.eval_shape(jax.random.key_data, value)
    if is_array_leaf(value) or isinstance(value, jax.ShapeDtypeStruct):
        shape = np.shape(value)
        return jax.ShapeDtypeStruct(shape, getattr(value, "dtype", None))
    return value


def compare(given, expected):
    """Differences between two PyTrees of arrays, by path.

    Returns:
        (missing, extra, mismatched): paths in `expected` but not `given`,
        paths in `given` but not `expected`, and `(path, given, expected)`
        for leaves whose shapes, or kinds of dtype (floating, integer, key),
        differ; `given` and `expected` are shapes, or dtypes where the
        shapes agree.
    """
    given = _specs_by_path(given)
    expected = _specs_by_path(expected)
    missing = [p for p in expected if p not in given]
    extra = [p for p in given if p not in expected]
    mismatched = []
    for p in expected:
        if p not in given or None in (given[p], expected[p]):
            continue
        (g_shape, g_dtype), (e_shape, e_dtype) = given[p], expected[p]
        if tuple(g_shape) != tuple(e_shape):
            mismatched.append((p, tuple(g_shape), tuple(e_shape)))
        elif dtype_kind(g_dtype) != dtype_kind(e_dtype):
            mismatched.append((p, jnp.dtype(g_dtype), jnp.dtype(e_dtype)))
    return missing, extra, mismatched


def dtype_kind(dtype):
    if dtype is None:
        return None
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return "key"
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return "floating"
    return "integer or bool"


def _specs_by_path(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        path_text(path_parts(keypath)): _spec_or_none(leaf)
        for keypath, leaf in leaves
    }


def _spec_or_none(leaf):
    leaf = shape_struct(leaf)
    if not hasattr(leaf, "shape"):
        return None
    return tuple(leaf.shape), getattr(leaf, "dtype", None)


def non_array_leaves(tree):
    """`(path, leaf)` of the leaves of `tree` that are not arrays."""
    return [
        (path_text(path_parts(keypath)), leaf)
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if not (is_array_leaf(leaf) or _is_typed_key(leaf))
    ]


def check_state_structure(arg, new_state, state_tree):
    """Raises if `new_state` has another structure than the held state."""
    new_def = jax.tree_util.tree_structure(new_state)
    if new_def == state_tree.treedef:
        leaves = state_tree.leaves_of(new_state)
        held = state_tree.variables
        if all(
            np.shape(new) == tuple(var.shape)
            and dtype_kind(getattr(new, "dtype", None))
            in (None, dtype_kind(var.dtype))
            for new, var in zip(leaves, held)
        ):
            return
    missing, extra, mismatched = compare(new_state, state_tree.tree)
    raise ValueError(
        _errors.state_structure_changed(arg, missing, extra, mismatched)
    )


class FlaxVariable(keras.Variable):
    """A Keras variable that keeps what Flax knows about it.

    Args:
        axes: Flax's partitioning of the variable (mesh axis names, None for
            replicated dimensions), from `nn.with_partitioning` or NNX
            sharding metadata. Under a `keras.distribution` whose device mesh
            has these axes it is the variable's layout, unless an entry of
            the distribution's `LayoutMap` matches the variable's path.
        mirror: an `nnx.Variable` into which every concrete value the
            variable is given is copied (see `_nnx`).
    """

    def __init__(self, *args, axes=None, mirror=None, **kwargs):
        self._axes = axes
        self._mirror = None  # not while Keras sets the initial value
        super().__init__(*args, **kwargs)
        self._mirror = mirror

    def _initialize_layout(self):
        if self._layout is None and self._axes is not None:
            self._layout = flax_layout(self.path, self._axes)
        super()._initialize_layout()

    def _direct_assign(self, value):
        super()._direct_assign(value)
        if self._mirror is not None and _backends.is_concrete(value):
            self._mirror(_backends.to_jax(value))

    def mirror(self):
        """Copies the current value into the mirror, if any."""
        if self._mirror is not None:
            self._mirror(_backends.to_jax(self.value))


def flax_layout(path, axes):
    """The layout for Flax partitioning `axes`, or None to let Keras choose.

    None when no distribution is set, when the distribution's `LayoutMap`
    has an entry for `path` (the user's choice wins), or when an axis is
    not in its device mesh.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is not None and layout_map[path] is not None:
        return None
    mesh = distribution.device_mesh
    if not all(a is None or a in mesh.axis_names for a in axes):
        return None
    return keras.distribution.TensorLayout(axes, mesh)
