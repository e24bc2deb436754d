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
from keras_flax import _errors
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


def path_text(parts):
    return "/".join(parts) if parts else "(root)"


def _is_typed_key(value):
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(
        dtype, jax.dtypes.prng_key
    )


class VariableTree:
    """A PyTree whose array leaves are held in Keras variables of one layer.

    Each array leaf is a variable of its own, named after its path, or,
    with `packed=True`, a view into one flat variable per dtype ("pack"),
    so that a module with hundreds of leaves costs Keras' per-step work of
    a few variables.

    Attributes:
        tree: the PyTree with a `keras.Variable` (or a `PackedLeaf` view)
            at each array leaf, and its static leaves.
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
        packed=False,
        frozen=(),
    ):
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(values)
        self._static = []
        self._key_impls = []
        self.names = []
        self.paths = []
        arrays, metadata, parts_list = [], [], []
        for keypath, leaf in leaves:
            if not (is_array_leaf(leaf) or _is_typed_key(leaf)):
                self._static.append(leaf)
                continue
            parts = name_fn(path_parts(keypath))
            self._static.append(_VARIABLE)
            self._key_impls.append(
                jax.random.key_impl(leaf) if _is_typed_key(leaf) else None
            )
            arrays.append(_initial_array(layer, leaf))
            metadata.append(metadata_fn and metadata_fn(path_parts(keypath)))
            parts_list.append(parts)
            self.names.append(path_text(parts))
            self.paths.append(path_text(path_parts(keypath)))
        self._leaf_specs = [(a.shape, a.dtype) for a in arrays]
        # Whether each leaf trains: leaves at `frozen` paths do not.
        trains = [trainable and p not in frozen for p in self.paths]
        self.autocast = autocast
        self._slots = None
        if packed:
            self._pack(layer, arrays, metadata, trains, trainable, autocast)
        else:
            self.variables = [
                _new_variable(layer, parts, a, t, autocast, meta)
                for parts, a, t, meta in zip(
                    parts_list, arrays, trains, metadata, strict=True
                )
            ]
            self._mirrors = [(meta or {}).get("mirror") for meta in metadata]
            self.tree = self._unflatten(self.variables)

    def freeze(self, paths):
        """Makes the variables of the leaves at `paths` non-trainable (a
        packed tree takes `frozen` when it is made)."""
        if not paths:
            return
        assert self._slots is None, "packed leaves are frozen when packed"
        for path, variable in zip(self.paths, self.variables, strict=True):
            if path in paths:
                variable.trainable = False

    def _pack(self, layer, arrays, metadata, trains, trainable, autocast):
        """One flat variable per dtype (and trainability); `_slots[i]` is
        leaf i's place."""
        groups = {}  # (dtype, trains) -> leaf indices, in order of appearance
        for i, a in enumerate(arrays):
            groups.setdefault((jnp.dtype(a.dtype), trains[i]), []).append(i)
        self._slots = [None] * len(arrays)
        self._members = list(groups.values())  # leaf indices of each pack
        self.variables = []
        self._mirrors = []
        for g, ((dtype, trains_g), indices) in enumerate(groups.items()):
            offset, mirrors = 0, []
            for i in indices:
                size = int(np.prod(arrays[i].shape, dtype=np.int64))
                self._slots[i] = (g, offset, size, arrays[i].shape)
                mirror = (metadata[i] or {}).get("mirror")
                if mirror is not None:
                    mirrors.append((offset, size, arrays[i].shape, mirror))
                offset += size
            flat = jnp.concatenate(
                [arrays[i].reshape(-1) for i in indices]
            ).astype(dtype)
            parts = ("packed", dtype.name)
            if not trainable:
                parts = ("state", *parts)
            elif not trains_g:  # parameters the model does not use
                parts = ("packed", "frozen", dtype.name)
            meta = {"mirror": _slices_mirror(mirrors) if mirrors else None}
            self._mirrors.append(meta["mirror"])
            self.variables.append(
                _new_variable(layer, parts, flat, trains_g, autocast, meta)
            )
        views = [
            PackedLeaf(self.variables[g], offset, size, shape, layer, name)
            for (g, offset, size, shape), name in zip(self._slots, self.names)
        ]
        self.tree = self._unflatten(views)

    @property
    def packed(self):
        return self._slots is not None

    def values(self):
        """The current values of the variables."""
        held = _private.held_values(self.variables)
        if held is not None:
            return held
        return [variable.value for variable in self.variables]

    def leaves(self, values):
        """The array leaves, in leaf order, from the variables' `values`."""
        if self._slots is None:
            return list(values)
        # One split per pack (its gradient is one concatenation; separate
        # slices would each be padded to the pack's size and summed).
        pieces = {}
        for g, value in enumerate(values):
            ends = [self._slots[i][1] for i in self._members[g][1:]]
            pieces[g] = iter(jnp.split(value, ends))
        return [
            next(pieces[g]).reshape(shape) for g, _, _, shape in self._slots
        ]

    def rebuild(self, values):
        """The PyTree with the variables' `values` at its leaves.

        Key data held for typed PRNG keys is wrapped back into keys.
        """
        return self.unflatten_leaves(self.leaves(values))

    def unflatten_leaves(self, leaves):
        """The PyTree of array `leaves` (leaf order)."""
        return self._unflatten(
            jax.random.wrap_key_data(v, impl=impl) if impl else v
            for v, impl in zip(leaves, self._key_impls)
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

    def updates(self, new_leaves, old_leaves):
        """New values for the variables, `None` for those left unchanged.

        A leaf is unchanged when a call returns the very array it was
        given (or `None`); a pack is written when any of its leaves changed.
        """
        changed = [
            None if new is None or new is old else new
            for new, old in zip(new_leaves, old_leaves)
        ]
        if self._slots is None:
            return changed
        updates = [None] * len(self.variables)
        for g, (variable, members) in enumerate(
            zip(self.variables, self._members)
        ):
            if all(changed[i] is None for i in members):
                continue
            dtype = jnp.dtype(keras.backend.standardize_dtype(variable.dtype))
            updates[g] = jnp.concatenate(
                [
                    jnp.reshape(
                        old_leaves[i] if changed[i] is None else changed[i],
                        (-1,),
                    ).astype(dtype)
                    for i in members
                ]
            )
        return updates

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
        for variable, value in zip(self.variables, values):
            if value is not None:
                variable.assign(value)

    @property
    def treedef(self):
        return self._treedef


class PackedLeaf:
    """A view of one leaf inside a packed variable.

    Reads and writes go to the pack: `value`, `numpy()`, `assign(value)`,
    with the leaf's `shape`, `dtype` and Flax `path`.
    """

    def __init__(self, pack, offset, size, shape, layer, name):
        self._pack = pack
        self._offset = offset
        self._size = size
        self.shape = tuple(shape)
        self.path = f"{layer.name}/{name}"
        self.name = name.rsplit("/", 1)[-1]

    @property
    def dtype(self):
        return self._pack.dtype

    @property
    def trainable(self):
        return self._pack.trainable

    @property
    def value(self):
        flat = self._pack.value[self._offset : self._offset + self._size]
        return keras.ops.reshape(flat, self.shape)

    def numpy(self):
        return keras.ops.convert_to_numpy(self.value)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.numpy(), dtype=dtype)

    def assign(self, value):
        value = keras.ops.reshape(keras.ops.cast(value, self.dtype), (-1,))
        self._pack.assign(
            keras.ops.slice_update(self._pack.value, (self._offset,), value)
        )

    def __repr__(self):
        return (
            f"<PackedLeaf path={self.path} shape={self.shape} "
            f"dtype={self.dtype}>"
        )


def _slices_mirror(mirrors):
    """A mirror writing each leaf's slice of a pack into its own mirror."""

    def mirror(value):
        for offset, size, shape, leaf_mirror in mirrors:
            leaf_mirror(jnp.reshape(value[offset : offset + size], shape))

    return mirror


_VARIABLE = object()


def _key_data(value):
    if value is not None and _is_typed_key(value):
        return jax.random.key_data(value)
    return value


def _initial_array(layer, value):
    """A copy of a leaf as a JAX array in the variable's dtype.

    Floats follow the layer's dtype policy; a copy, so that arrays the user
    passed stay valid when Keras donates the variables' buffers to a
    jitted train step.
    """
    if _is_typed_key(value):
        value = jax.random.key_data(value)
    dtype = getattr(value, "dtype", None)
    dtype = np.asarray(value).dtype if dtype is None else dtype
    if jnp.issubdtype(dtype, jnp.floating):
        dtype = layer.variable_dtype
    else:
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    return jnp.array(value, dtype=dtype, copy=True)


def _new_variable(layer, parts, initial, trainable, autocast, metadata=None):
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
    given = specs_by_path(given)
    expected = specs_by_path(expected)
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


def specs_by_path(tree):
    """`(shape, dtype)` of each leaf of `tree` (arrays or variables), by
    path text (None for a leaf that is not an array)."""
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


def check_no_state(arg, new_state):
    """Raises if a layer holding no state is given some to keep."""
    leaves = jax.tree_util.tree_flatten_with_path(new_state)[0]
    if leaves:
        paths = [path_text(path_parts(keypath)) for keypath, _ in leaves]
        raise ValueError(_errors.state_without_room(arg, paths))


def check_state_structure(arg, new_state, state_tree):
    """Raises if `new_state` has another structure than the held state."""
    new_def = jax.tree_util.tree_structure(new_state)
    if new_def == state_tree.treedef:
        leaves = state_tree.leaves_of(new_state)
        held = state_tree.leaf_specs()
        if all(
            new is None
            or (
                np.shape(new) == tuple(shape)
                and dtype_kind(getattr(new, "dtype", None))
                in (None, dtype_kind(dtype))
            )
            for new, (shape, dtype) in zip(leaves, held)
        ):
            return
    missing, extra, mismatched = compare(new_state, state_tree.tree)
    raise ValueError(
        _errors.state_structure_changed(arg, missing, extra, mismatched)
    )


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
