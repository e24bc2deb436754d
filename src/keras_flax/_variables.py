"""PyTrees of arrays <-> Keras variables.

A `VariableTree` holds one PyTree (the `params` or the `state` of a model)
as Keras variables named after their PyTree path, so that
`variables["params"]["Dense_0"]["kernel"]` becomes a variable whose `.path`
ends in `Dense_0/kernel`: `keras.distribution.LayoutMap` keys and
`model.summary()` see Flax names. Leaves that are not arrays or numbers
(configuration) stay in the tree as they are.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import Protocol

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import _backends
from keras_flax import _private
from keras_flax._model import PyTree


def is_array_leaf(value: Any) -> bool:
    return isinstance(
        value, (jax.Array, np.ndarray, np.generic, bool, int, float)
    )


def path_parts(keypath: Iterable[Any]) -> tuple[str, ...]:
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


def keyed_leaves(
    tree: PyTree, skip: int = 0
) -> list[tuple[tuple[str, ...], Any, str]]:
    """`(path parts, leaf, path text)` of each leaf of `tree`, the parts
    without their first `skip` (what a `wrt` filter is given, see
    `_model.FineTuning.candidates`)."""
    return [
        (path_parts(keypath)[skip:], leaf, path_text(keypath))
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def path_text(path: Iterable[Any]) -> str:
    """The one text of a path: a `jax.tree_util` key path, an NNX path or
    name parts, as `Dense_0/kernel` (`(root)` for the empty path)."""
    parts = path_parts(path)
    return "/".join(parts) if parts else "(root)"


def is_typed_key(value: Any) -> Any:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(
        dtype, jax.dtypes.prng_key
    )


class Storage(Protocol):
    """How a tree's array leaves are held in Keras variables.

    `Plain` (one variable per leaf) and `_packing.Packed` (small leaves of
    one dtype sharing a flat variable) are the two; a `VariableTree` holds
    one and is the same whichever it holds.

    Attributes:
        variables: the Keras variables.
        members: the leaf indices each variable holds, in variable order.
    """

    variables: list[Any]
    members: list[list[int]]

    def holders(self) -> list[Any]:
        """What holds each leaf, in leaf order: its Keras variable, or a
        view of its part of one, with `value` and `assign`."""
        ...

    def leaves(self, values: list[Any]) -> list[Any]:
        """The array leaves, in leaf order, from the variables' values."""
        ...

    def updates(
        self, new_leaves: list[Any], old_leaves: list[Any]
    ) -> list[Any]:
        """New values for the variables from new leaves (None for a leaf
        left unchanged), None for a variable left unchanged."""
        ...

    def mirrors(self) -> list[Callable[[Any], None] | None]:
        """For each variable, what copies its value into the user's module
        (None where nothing does)."""
        ...


@dataclasses.dataclass(frozen=True)
class Leaf:
    """An array leaf to hold: its initial value, the name parts of its
    variable, whether it trains, and its `metadata` (Flax axes, mirror)."""

    array: jax.Array
    parts: tuple[str, ...]
    trains: bool
    metadata: dict[str, Any] | None


class Plain:
    """One Keras variable per leaf (see `Storage`)."""

    def __init__(
        self, layer: Any, leaves: list[Leaf], trainable: bool, autocast: bool
    ) -> None:
        del trainable  # each variable is named by its own path
        self.variables = [
            new_variable(
                layer,
                leaf.parts,
                leaf.array,
                leaf.trains,
                autocast,
                leaf.metadata,
            )
            for leaf in leaves
        ]
        self.members = [[i] for i in range(len(leaves))]
        self._mirrors = [(leaf.metadata or {}).get("mirror") for leaf in leaves]

    def holders(self) -> list[Any]:
        return list(self.variables)

    def leaves(self, values: list[Any]) -> list[Any]:
        return list(values)

    def updates(
        self, new_leaves: list[Any], old_leaves: list[Any]
    ) -> list[Any]:
        return changed_leaves(new_leaves, old_leaves)

    def mirrors(self) -> list[Callable[[Any], None] | None]:
        return list(self._mirrors)


StorageFactory = Callable[[Any, list[Leaf], bool, bool], Storage]


class VariableTree:
    """A PyTree whose array leaves are held in Keras variables of one layer.

    The leaves are held by a `Storage` (`Plain` by default); the empty tree
    (`None`) holds nothing.

    Attributes:
        tree: the PyTree with what holds each array leaf (a `keras.Variable`
            or a packed leaf's view) at its place, and its static leaves.
        variables: the Keras variables.
        names: the name of each array leaf inside the layer, as a string.
        paths: the path of each array leaf inside the tree, as a string.
        keys: the path of each array leaf inside the tree, as its parts.
    """

    def __init__(
        self,
        layer: Any,
        values: Any,
        trainable: bool,
        name_fn: Callable[[tuple[str, ...]], tuple[str, ...]],
        autocast: bool = True,
        metadata_fn: Callable[[tuple[str, ...]], dict[str, Any]] | None = None,
        frozen: Collection[str] = (),
        float_dtype: Callable[[Any], Any] | None = None,
        copy: bool = True,
        storage: StorageFactory = Plain,
    ) -> None:
        flat, self._treedef = jax.tree_util.tree_flatten_with_path(values)
        self._static = []
        self._key_impls = []
        self.names = []
        self.paths = []
        self.keys = []
        leaves = []
        for keypath, leaf in flat:
            if not (is_array_leaf(leaf) or is_typed_key(leaf)):
                self._static.append(leaf)
                continue
            self._static.append(_VARIABLE)
            self._key_impls.append(
                jax.random.key_impl(leaf) if is_typed_key(leaf) else None
            )
            parts = name_fn(path_parts(keypath))
            path = path_text(keypath)
            leaves.append(
                Leaf(
                    array=_initial_array(leaf, float_dtype, copy),
                    parts=parts,
                    # Leaves at `frozen` paths do not train.
                    trains=trainable and path not in frozen,
                    metadata=metadata_fn and metadata_fn(path_parts(keypath)),
                )
            )
            self.names.append(path_text(parts))
            self.paths.append(path)
            self.keys.append(path_parts(keypath))
        self._leaf_specs = [
            (leaf.array.shape, leaf.array.dtype) for leaf in leaves
        ]
        self.autocast = autocast
        self._storage = storage(layer, leaves, trainable, autocast)
        self.variables = self._storage.variables
        self.tree = self.unflatten(self._storage.holders())

    @property
    def holds_nothing(self) -> bool:
        """Whether the tree is `None` (no tree given or created)."""
        return self._treedef == _NONE

    def holders(self) -> list[Any]:
        """What holds each array leaf, in leaf order: its Keras variable,
        or, packed, a view with `value` and `assign`."""
        return self._storage.holders()

    def freeze(self, paths: Collection[str]) -> None:
        """Makes the variables holding only leaves at `paths` non-trainable
        (a pack is frozen when it is made: see `_packing`)."""
        storage = self._storage
        for variable, members in zip(
            storage.variables, storage.members, strict=True
        ):
            if all(self.paths[i] in paths for i in members):
                variable.trainable = False

    def trains(self) -> list[bool]:
        """Whether each array leaf trains (its variable does), in order."""
        storage = self._storage
        trains = [False] * len(self.keys)
        for variable, members in zip(
            storage.variables, storage.members, strict=True
        ):
            for i in members:
                trains[i] = bool(variable.trainable)
        return trains

    def values(self) -> list[Any]:
        """The current values of the variables."""
        held = _private.held_values(self.variables)
        if held is not None:
            return held
        return [variable.value for variable in self.variables]

    def leaves(self, values: list[Any]) -> list[Any]:
        """The array leaves, in leaf order, from the variables' `values`."""
        return self._storage.leaves(values)

    def rebuild(self, values: list[Any]) -> Any:
        """The PyTree with the variables' `values` at its leaves.

        Key data held for typed PRNG keys is wrapped back into keys.
        """
        return self.unflatten_leaves(self.leaves(values))

    def unflatten_leaves(self, leaves: Iterable[Any]) -> Any:
        """The PyTree of array `leaves` (leaf order)."""
        return self.unflatten(
            jax.random.wrap_key_data(uint32_key_data(v), impl=impl)
            if impl
            else v
            for v, impl in zip(leaves, self._key_impls, strict=True)
        )

    def unflatten(self, values: Iterable[Any]) -> Any:
        """The PyTree of `values` at the variables' places (leaf order)."""
        values = iter(values)
        leaves = [next(values) if s is _VARIABLE else s for s in self._static]
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def leaves_of(self, tree: Any, given: list[Any] | None = None) -> list[Any]:
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

    def updates(
        self, new_leaves: list[Any], old_leaves: list[Any]
    ) -> list[Any]:
        """New values for the variables, `None` for those left unchanged.

        A leaf is unchanged when a call returns the very array it was
        given (or `None`); a variable holding several leaves is written
        when any of them changed.
        """
        return self._storage.updates(new_leaves, old_leaves)

    def mirror_values(self) -> None:
        """Copies each variable's current value into its mirror (the
        user's NNX module), where it has one."""
        for variable, mirror in zip(
            self.variables, self._storage.mirrors(), strict=True
        ):
            if mirror is not None:
                mirror(_backends.to_jax(variable.value))

    def leaf_specs(self) -> list[tuple[tuple[int, ...], Any]]:
        """`(shape, dtype)` of each array leaf, in leaf order."""
        return list(self._leaf_specs)

    def assign(self, values: list[Any]) -> None:
        """Assigns `values` (`None` to skip) to the variables."""
        for variable, value in zip(self.variables, values, strict=True):
            if value is not None:
                variable.assign(value)

    @property
    def treedef(self) -> Any:
        return self._treedef


_VARIABLE = object()
_NONE = jax.tree_util.tree_structure(None)


def changed_leaves(
    new_leaves: list[Any], old_leaves: list[Any]
) -> list[Any | None]:
    """`new_leaves`, with None where a call returned the very array it was
    given (or None): those are not written back."""
    return [
        None if new is None or new is old else new
        for new, old in zip(new_leaves, old_leaves, strict=True)
    ]


def uint32_key_data(value: Any) -> Any:
    """Key data held by a variable as JAX's `uint32` array: another
    backend's, read eagerly, is converted (TensorFlow's variable; PyTorch's
    integer tensor, PyTorch having no `uint32`)."""
    value = _backends.to_jax(value)
    return value if value.dtype == jnp.uint32 else value.astype(jnp.uint32)


def key_data(value: Any) -> Any:
    if value is not None and is_typed_key(value):
        return jax.random.key_data(value)
    return value


def _initial_array(
    value: Any, float_dtype: Any = None, copy: bool = True
) -> Any:
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


def new_variable(
    layer: Any,
    parts: tuple[str, ...],
    initial: Any,
    trainable: bool,
    autocast: bool,
    metadata: Any = None,
) -> Any:
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


def shape_struct(value: Any) -> Any:
    """`jax.ShapeDtypeStruct` of an array-like leaf, or the leaf itself."""
    if is_typed_key(value):
        value = jax.eval_shape(jax.random.key_data, value)
    if is_array_leaf(value) or isinstance(value, jax.ShapeDtypeStruct):
        shape = np.shape(value)
        return jax.ShapeDtypeStruct(shape, getattr(value, "dtype", None))
    return value


def with_leaves(tree: PyTree, leaves: Any) -> Any:
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


def _dict_copy(tree: PyTree) -> Any:
    if isinstance(tree, Mapping):
        return {k: _dict_copy(v) for k, v in tree.items()}
    return tree


def by_path(tree: PyTree) -> dict[str, Any]:
    """The leaves of `tree` (arrays or variables) by path text. A Keras
    variable is a leaf (in Keras' NNX mode it is also a PyTree node)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, keras.Variable)
    )[0]
    return {path_text(keypath): leaf for keypath, leaf in leaves}


def specs_of(
    leaves: Any,
) -> dict[str, tuple[tuple[int, ...], Any] | None]:
    """`(shape, dtype)` of each of `leaves` (a dict of arrays or variables),
    None for one that is not an array."""
    return {path: _spec_or_none(leaf) for path, leaf in leaves.items()}


def specs_by_path(
    tree: PyTree,
) -> dict[str, tuple[tuple[int, ...], Any] | None]:
    """`(shape, dtype)` of each leaf of `tree` (arrays or variables), by
    path text (None for a leaf that is not an array)."""
    return specs_of(by_path(tree))


def _spec_or_none(leaf: Any) -> tuple[tuple[int, ...], Any] | None:
    leaf = shape_struct(leaf)
    if not hasattr(leaf, "shape"):
        return None
    return tuple(leaf.shape), getattr(leaf, "dtype", None)


def flax_layout(path: str, axes: Any) -> Any:
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
