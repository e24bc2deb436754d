"""The arrays of an NNX module that a layer holds.

Keras donates its variables' buffers to every compiled step, so the layer
holds only buffers it owns (`own`), and writes the values Keras gives it
back into the user's module (`write`, `write_attribute`): the module holds
the layer's values without being asked. Its RNG streams are reseeded from
the layer's seed (`reseed`).
"""

import inspect
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from keras_flax import _backends
from keras_flax import _rng
from keras_flax import _sizes
from keras_flax import _variables
from keras_flax._errors import more


def own(module: Any) -> None:
    """Moves the module's arrays into buffers of the layer's own, one leaf
    at a time, re-pointing the module at each as it goes.

    Keras donates its variables' buffers to every compiled step, so the
    layer holds only buffers it owns: an array nothing else holds is freed
    as soon as its copy is made (the peak is the parameters and the largest
    leaf), and one the user still holds apart from the module (an
    `nnx.clone` made before wrapping, a state snapshot, another layer's
    module) stays valid. Two attributes holding one array get one buffer
    each.
    """
    state = nnx.state(module)
    flat = list(nnx.to_flat_state(state))
    del state
    while flat:
        path, leaf = flat.pop()
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            if isinstance(value, jax.Array):
                leaf.set_value(_copy(value))
        elif isinstance(leaf, jax.Array):
            copied = _copy(leaf)
            del leaf
            _set_leaf(module, path, copied)


def _copy(array: jax.Array) -> jax.Array:
    """A copy in a buffer of its own, where `array` is laid out (a buffer
    copy: no program run)."""
    return jax.device_put(array, may_alias=False)


def _set_leaf(module: Any, path: tuple[Any, ...], value: Any) -> None:
    """Sets the plain array at `path` of `module`'s graph to `value`; an
    immutable container on the way (a tuple in `nnx.data((a, b))`) is
    rebuilt, as its own type, holding it."""
    nodes = [module]
    for key in path[:-1]:
        node = nodes[-1]
        nodes.append(node[key] if _indexed(node) else getattr(node, key))
    for node, key in zip(reversed(nodes), reversed(path), strict=True):
        if not isinstance(node, tuple):
            if _indexed(node):
                node[key] = value
            else:
                setattr(node, key, value)
            return
        items = list(node)
        items[key] = value
        value = _sizes.rebuilt(node, items)


def _indexed(node: Any) -> bool:
    """Whether a graph node holds its children by index or key."""
    return isinstance(node, (list, tuple, dict, nnx.List, nnx.Dict))


def write(target: Any, value: Any) -> None:
    """Points the NNX Variable `target` at `value`.

    Keras writes the trained values back into its variables at the end of
    each epoch and of `fit`, `evaluate` and `predict`, and when weights are
    loaded; the user's module is re-pointed at each such value, so it holds
    the trained values without being asked, and shares its arrays with
    the layer (one copy of each weight). Where the module's dtype differs
    (a dtype policy given to the layer), it gets a copy in its own dtype.
    """
    current = target.get_value()
    if jax.dtypes.issubdtype(current.dtype, jax.dtypes.prng_key):
        # Key data as JAX's uint32 (PyTorch's tensors of it are int32).
        data = _variables.uint32_key_data(_backends.own_array(value))
        value = jax.random.wrap_key_data(
            data, impl=jax.random.key_impl(current)
        )
    else:
        value = _backends.own_array(value, current.dtype)
    target.set_value(value)


def write_attribute(
    module: Any, path: tuple[Any, ...], dtype: Any, value: Any
) -> None:
    """Sets the plain array attribute at `path` of `module` to `value`
    (see `write`)."""
    _set_leaf(module, path, _backends.own_array(value, dtype))


def reseed(module: Any, seed: Any) -> None:
    """Reseeds every RNG stream of `module` from `seed`.

    A stacked stream (one key per slice, as `nnx.split_rngs` makes them for
    `nnx.vmap`-created layers) gets one new key per slice, split from the
    stream's key as `split_rngs` splits it (Flax's "match_shape" policy).
    """
    streams = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.RngStream):
            streams.setdefault(node.tag, []).append((path, node.key.shape))
    stacked = [
        _variables.path_text(path)
        for found in streams.values()
        for path, shape in found
        if shape != ()
    ]
    options: dict[str, Any] = {}
    if stacked:
        if "policy" not in inspect.signature(nnx.reseed).parameters:
            raise ValueError(stacked_streams_without_policy(stacked))
        options["policy"] = "match_shape"
    key = jax.random.key(seed)
    keys: dict[str, Any] = {
        s: jax.random.fold_in(key, _rng.stream_id(s)) for s in streams
    }
    nnx.reseed(module, **options, **keys)


def stacked_streams_without_policy(paths: Sequence[str]) -> str:
    listed = ", ".join(paths[:6]) + more(paths, 6)
    return (
        "`seed` reseeds every RNG stream of the NNX module, but this Flax "
        "version's `nnx.reseed` cannot reseed stacked streams (one key per "
        "slice, made by `nnx.split_rngs`). Received: seed with stacked "
        f"streams at {listed}. Leave `seed` out and seed the module where "
        "you build it (`nnx.Rngs(seed)`), or upgrade Flax."
    )
