"""Where a layer's weights live under a `keras.distribution`.

A weight's layout is, in this order: the distribution's `LayoutMap` entry
for its path, the Flax partitioning metadata of the leaf (`axes`), or the
distribution's default (replicated). `init_shardings` gives these as JAX
shardings before any weight exists, so that `init` runs with them as its
output shardings and each device only ever holds its shards (Keras itself
would create each variable whole on one device, then lay it out).
`warn_unmatched` names the `LayoutMap` keys aimed at a layer that match
none of its weights.
"""

import difflib
import re
import warnings
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Sequence
from typing import Any

import jax
import keras

from keras_flax import _private
from keras_flax import _variables


class _Weight:
    """What `Distribution.get_variable_layout` reads of a variable: its
    path and shape (the variable does not exist yet)."""

    def __init__(self, path: str, shape: Sequence[int | None]) -> None:
        self.path = path
        self.shape = tuple(shape)


def layout(path: str, shape: Sequence[int | None], axes: Any) -> Any:
    """The `TensorLayout` of a weight at `path` (None: no distribution)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    if axes is not None and not _private.layout_map_has(distribution, path):
        flax_layout = _variables.flax_layout(path, axes)
        if flax_layout is not None:
            return flax_layout
    return distribution.get_variable_layout(_Weight(path, shape))


def init_shardings(
    layer_name: str, trees: Any, name_fn: Any, axes: Any
) -> tuple[Any, ...] | None:
    """The shardings of `trees` (shape trees: params, state) for an `init`
    run under the distribution in force; None where no weight is sharded
    (nothing to gain) or no distribution is set.

    Args:
        layer_name: the layer's name, the first part of weight paths.
        trees: `(params, state)`, trees of `jax.ShapeDtypeStruct`s.
        name_fn: `(trainable, path parts) -> name parts` (the model's).
        axes: Flax mesh axes by leaf path text.
    """
    if keras.distribution.distribution() is None:
        return None
    sharded = False

    def sharding(trainable: bool) -> Callable[[Any, Any], Any]:
        def leaf(keypath: Any, value: Any) -> Any:
            nonlocal sharded
            parts = _variables.path_parts(keypath)
            name = _variables.path_text(name_fn(trainable, parts))
            found = layout(
                f"{layer_name}/{name}",
                value.shape,
                axes.get(_variables.path_text(parts)),
            )
            assert found is not None  # a layout for every weight
            backend = found.backend_layout
            sharded = sharded or not backend.is_fully_replicated
            return backend

        return leaf

    shardings = tuple(
        jax.tree_util.tree_map_with_path(sharding(trainable), tree)
        for trainable, tree in zip((True, False), trees, strict=True)
    )
    return shardings if sharded else None


def sharded_init(init: Any, shardings: Any) -> Any:
    """`init` jitted with `shardings` as its output shardings."""
    return jax.jit(init, out_shardings=shardings)


# `LayoutMap` keys already warned about, by the map's `id` (a `LayoutMap`
# is a mutable mapping: neither hashable nor weakly referable as a key).
_WARNED = {}


def warn_unmatched(layer_name: str, paths: Sequence[str]) -> None:
    """Warns once for each `LayoutMap` key aimed at this layer (see
    `_aimed`) that matches none of its weight `paths` (full paths)."""
    distribution = keras.distribution.distribution()
    layout_map = _private.layout_map(distribution)
    if not layout_map or not paths:
        return
    warned = _WARNED.setdefault(id(layout_map), set())
    parts = {p for path in paths for p in path.split("/")[1:-1]}
    for key in list(layout_map):
        if key in warned or any(_matches(key, path) for path in paths):
            continue
        if _aimed(key, layer_name, parts):
            warned.add(key)
            warnings.warn(
                layout_key_unmatched(key, layer_name, paths),
                stacklevel=2,
            )


def layout_key_unmatched(
    key: Any, layer_name: str, paths: Sequence[str]
) -> str:
    names = [path.split("/", 1)[-1] for path in paths]
    literal = "/".join(re.findall(r"[\w-]+", key))
    closest = difflib.get_close_matches(literal, names, n=1, cutoff=0) or names
    shown = ", ".join(repr(p) for p in paths[:4])
    more = ", ..." if len(paths) > 4 else ""
    return (
        f"LayoutMap key {key!r} matches no weight of layer {layer_name!r}, "
        "so it lays out nothing. Keras matches each key against a weight's "
        f"whole path (`re.fullmatch`); this layer's are {shown}{more}. "
        f"Write the whole path or a pattern such as '.*/{closest[0]}'."
    )


def _matches(key: Any, path: str) -> Any:
    try:
        return key == path or re.fullmatch(key, path) is not None
    except re.error:
        return False


def _aimed(key: Any, layer_name: str, parts: Collection[str]) -> bool:
    """Whether a key is meant for this layer: it starts with the layer's
    name, or it names one of the layer's modules (`Dense_0`, or another
    of Flax's names of that family, `Dense_7`) and no other layer by a
    literal first part."""
    first = key.split("/", 1)[0]
    if first == layer_name:
        return True
    families = {_family(part) for part in parts}
    if re.fullmatch(r"[\w-]+", first) and _family(first) not in families:
        return False  # another layer's, by name
    tokens = re.findall(r"[A-Za-z_]\w*", key)
    return any(_family(token) in families for token in tokens)


def _family(name: str) -> str:
    """A Flax module name without its counter: `Dense_3` -> `Dense`."""
    return re.sub(r"_\d+$", "", name)
