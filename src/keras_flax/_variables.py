"""PyTrees of arrays <-> Keras variables.

A `VariableTree` holds one PyTree (the `params` or the `state` of a model)
as Keras variables named after their PyTree path, so that
`variables["params"]["Dense_0"]["kernel"]` becomes a variable whose `.path`
ends in `Dense_0/kernel`: `keras.distribution.LayoutMap` keys and
`model.summary()` see Flax names. Leaves that are not arrays or numbers
(configuration) stay in the tree as they are.
"""

import contextlib
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import _backends
from keras_flax import _private


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


def keyed_leaves(tree, skip=0):
    """`(path parts, leaf, path text)` of each leaf of `tree`, the parts
    without their first `skip` (what a `wrt` filter is given, see
    `_model.FineTuning.candidates`)."""
    return [
        (path_parts(keypath)[skip:], leaf, path_text(keypath))
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def path_text(path):
    """The one text of a path: a `jax.tree_util` key path, an NNX path or
    name parts, as `Dense_0/kernel` (`(root)` for the empty path)."""
    parts = path_parts(path)
    return "/".join(parts) if parts else "(root)"


def is_typed_key(value):
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(
        dtype, jax.dtypes.prng_key
    )


class VariableTree:
    """A PyTree whose array leaves are held in Keras variables of one layer.

    Each array leaf is a variable of its own, named after its path (see
    `_packing.PackedTree` for leaves sharing variables).

    Attributes:
        tree: the PyTree with a `keras.Variable` at each array leaf, and
            its static leaves.
        variables: the Keras variables.
        names: the path of each leaf inside the tree, as a string.
    """

    def __init__(
        self,
        layer,
        values,
        trainable,
        name_fn,
        autocast=True,
        metadata_fn=None,
        frozen=(),
        float_dtype=None,
        copy=True,
    ):
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(values)
        self._static = []
        self._key_impls = []
        self.names = []
        self.paths = []
        arrays, metadata, parts_list = [], [], []
        for keypath, leaf in leaves:
            if not (is_array_leaf(leaf) or is_typed_key(leaf)):
                self._static.append(leaf)
                continue
            parts = name_fn(path_parts(keypath))
            self._static.append(_VARIABLE)
            self._key_impls.append(
                jax.random.key_impl(leaf) if is_typed_key(leaf) else None
            )
            arrays.append(_initial_array(leaf, float_dtype, copy))
            metadata.append(metadata_fn and metadata_fn(path_parts(keypath)))
            parts_list.append(parts)
            self.names.append(path_text(parts))
            self.paths.append(path_text(keypath))
        self._leaf_specs = [(a.shape, a.dtype) for a in arrays]
        # Whether each leaf trains: leaves at `frozen` paths do not.
        trains = [trainable and p not in frozen for p in self.paths]
        self.autocast = autocast
        self._make_variables(
            layer, arrays, metadata, trains, parts_list, trainable
        )

    def _make_variables(
        self, layer, arrays, metadata, trains, parts_list, trainable
    ):
        """One variable per leaf."""
        self.variables = [
            new_variable(layer, parts, a, t, self.autocast, meta)
            for parts, a, t, meta in zip(
                parts_list, arrays, trains, metadata, strict=True
            )
        ]
        self._mirrors = [(meta or {}).get("mirror") for meta in metadata]
        self.tree = self.unflatten(self.variables)

    def holders(self):
        """What holds each array leaf, in leaf order: its Keras variable,
        or, packed, a view with `value` and `assign`."""
        leaves = self._treedef.flatten_up_to(self.tree)
        return [
            leaf
            for leaf, s in zip(leaves, self._static, strict=True)
            if s is _VARIABLE
        ]

    def freeze(self, paths):
        """Makes the variables of the leaves at `paths` non-trainable."""
        for path, variable in zip(self.paths, self.variables, strict=True):
            if path in paths:
                variable.trainable = False

    # Whether leaves share variables (`_packing.PackedTree`).
    packed = False

    def values(self):
        """The current values of the variables."""
        held = _private.held_values(self.variables)
        if held is not None:
            return held
        return [variable.value for variable in self.variables]

    def leaves(self, values):
        """The array leaves, in leaf order, from the variables' `values`."""
        return list(values)

    def rebuild(self, values):
        """The PyTree with the variables' `values` at its leaves.

        Key data held for typed PRNG keys is wrapped back into keys.
        """
        return self.unflatten_leaves(self.leaves(values))

    def unflatten_leaves(self, leaves):
        """The PyTree of array `leaves` (leaf order)."""
        return self.unflatten(
            jax.random.wrap_key_data(v, impl=impl) if impl else v
            for v, impl in zip(leaves, self._key_impls, strict=True)
        )

    def unflatten(self, values):
        """The PyTree of `values` at the variables' places (leaf order)."""
        values = iter(values)
        leaves = [next(values) if s is _VARIABLE else s for s in self._static]
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def leaves_of(self, tree, given=None):
        """The leaves of `tree` (same structure) at the variables' places.

        `None` at a variable's place stays `None`: it marks a leaf that a
        call left unchanged; so does a leaf that is the very object at its
        place in `given` (`flatten_up_to` of the tree the call was given,
        taken before the call, whose containers it may mutate). Typed keys
        are compared before they become key data, which is a new array.
        """
        leaves = self._treedef.flatten_up_to(tree)
        if given is None:
            given = [None] * len(leaves)
        return [
            None if leaf is was else key_data(leaf)
            for leaf, was, s in zip(leaves, given, self._static, strict=True)
            if s is _VARIABLE
        ]

    def updates(self, new_leaves, old_leaves):
        """New values for the variables, `None` for those left unchanged.

        A leaf is unchanged when a call returns the very array it was
        given (or `None`).
        """
        return changed_leaves(new_leaves, old_leaves)

    def mirror_values(self):
        """Copies each variable's current value into its mirror (the
        user's NNX module), where it has one."""
        for variable, mirror in zip(self.variables, self._mirrors, strict=True):
            if mirror is not None:
                mirror(_backends.to_jax(variable.value))

    def leaf_specs(self):
        """`(shape, dtype)` of each array leaf, in leaf order."""
        return list(self._leaf_specs)

    def assign(self, values):
        """Assigns `values` (`None` to skip) to the variables."""
        for variable, value in zip(self.variables, values, strict=True):
            if value is not None:
                variable.assign(value)

    @property
    def treedef(self):
        return self._treedef


_VARIABLE = object()


def changed_leaves(new_leaves, old_leaves):
    """`new_leaves`, with None where a call returned the very array it was
    given (or None): those are not written back."""
    return [
        None if new is None or new is old else new
        for new, old in zip(new_leaves, old_leaves, strict=True)
    ]


def key_data(value):
    if value is not None and is_typed_key(value):
        return jax.random.key_data(value)
    return value


def _initial_array(value, float_dtype=None, copy=True):
    """A leaf as a JAX array in the variable's dtype.

    Floats take `float_dtype(dtype)` (the layer's rule) where given. A
    copy only where `copy` is set (arrays the user passed stay valid when
    Keras donates the variables' buffers to a jitted train step); arrays
    the layer owns or shares with the user's module are held as they are.
    """
    if is_typed_key(value):
        value = jax.random.key_data(value)
    dtype = getattr(value, "dtype", None)
    dtype = np.asarray(value).dtype if dtype is None else dtype
    if jnp.issubdtype(dtype, jnp.floating):
        dtype = dtype if float_dtype is None else float_dtype(dtype)
    else:
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    if copy or not isinstance(value, jax.Array):
        return jnp.array(value, dtype=dtype, copy=True)
    return value if value.dtype == dtype else value.astype(dtype)


def new_variable(layer, parts, initial, trainable, autocast, metadata=None):
    """Creates a variable named `parts` in the layer's scope and tracks it.

    `Layer.add_weight` takes a single name, so the scopes for the Flax path
    are opened here, inside the layer's own scope. With `metadata` (Flax
    `axes`, a `mirror`) the variable is a `_private.FlaxVariable`.
    """
    dtype = initial.dtype
    initial = _backends.initial_value(initial)
    parts = parts or ("params" if trainable else "state",)
    with contextlib.ExitStack() as scopes:
        scopes.enter_context(keras.name_scope(layer.name, caller=layer))
        for part in parts[:-1]:
            scopes.enter_context(keras.name_scope(part))
        factory = keras.Variable
        if metadata and _private.VARIABLE_HOOKS:
            axes, mirror = metadata.get("axes"), metadata.get("mirror")
            layout = None
            if axes is not None:
                layout = functools.partial(flax_layout, axes=axes)
            factory = functools.partial(
                _private.FlaxVariable, layout=layout, mirror=mirror
            )
        variable = factory(
            initializer=initial,
            dtype=dtype,
            trainable=trainable,
            autocast=autocast and jnp.issubdtype(dtype, jnp.floating),
            name=parts[-1],
        )
    _private.track_variable(layer, variable)
    return variable


def shape_struct(value):
    """`jax.ShapeDtypeStruct` of an array-like leaf, or the leaf itself."""
    if is_typed_key(value):
        value = jax.eval_shape(jax.random.key_data, value)
    if is_array_leaf(value) or isinstance(value, jax.ShapeDtypeStruct):
        shape = np.shape(value)
        return jax.ShapeDtypeStruct(shape, getattr(value, "dtype", None))
    return value


def with_leaves(tree, leaves):
    """`tree` (nested dicts, or None) with zeros added at `leaves`, a dict
    of path text -> `(shape, dtype)`."""
    if not leaves:
        return tree
    tree = _dict_copy(tree or {})
    for path, (shape, dtype) in leaves.items():
        *parents, name = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = jnp.zeros(shape, dtype)
    return tree


def _dict_copy(tree):
    if isinstance(tree, Mapping):
        return {k: _dict_copy(v) for k, v in tree.items()}
    return tree


def by_path(tree):
    """The leaves of `tree` (arrays or variables) by path text. A Keras
    variable is a leaf (in Keras' NNX mode it is also a PyTree node)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, keras.Variable)
    )[0]
    return {path_text(keypath): leaf for keypath, leaf in leaves}


def specs_of(leaves):
    """`(shape, dtype)` of each of `leaves` (a dict of arrays or variables),
    None for one that is not an array."""
    return {path: _spec_or_none(leaf) for path, leaf in leaves.items()}


def specs_by_path(tree):
    """`(shape, dtype)` of each leaf of `tree` (arrays or variables), by
    path text (None for a leaf that is not an array)."""
    return specs_of(by_path(tree))


def _spec_or_none(leaf):
    leaf = shape_struct(leaf)
    if not hasattr(leaf, "shape"):
        return None
    return tuple(leaf.shape), getattr(leaf, "dtype", None)


def flax_layout(path, axes):
    """The layout for Flax partitioning `axes`, or None to let Keras choose.

    None when no distribution is set, when the distribution's `LayoutMap`
    has an entry for `path` (the user's choice wins), or when an axis is
    not in its device mesh.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    if _private.layout_map_has(distribution, path):
        return None
    mesh = distribution.device_mesh
    if not all(a is None or a in mesh.axis_names for a in axes):
        return None
    return keras.distribution.TensorLayout(axes, mesh)
