"""A layer traced by jax2onnx (Keras' `model.export(format="onnx")`).

Keras calls the model under jax2onnx's trace. A layer called there
- checks its own program against jax2onnx's registry of converted
  primitives, so that an operation jax2onnx lacks is reported with the
  layer holding it and the fix, instead of as a bare primitive name once
  the whole model is traced;
- runs with Flax's `avg_pool` callable as Flax documents it: jax2onnx
  swaps it for a function taking `window_shape`, `strides` and `padding`
  by keyword only, which fails for `nn.avg_pool(x, (2, 2), (2, 2))`.
"""

import contextlib
import functools
import inspect
import sys

import flax.linen
import flax.linen.pooling
import jax
from flax import nnx

from keras_flax import _errors

# Flax's pooling functions as imported, before any conversion swaps them.
_POOLS = {
    (owner, "avg_pool"): owner.avg_pool
    for owner in (flax.linen, flax.linen.pooling, nnx)
}


def converting(inputs):
    """Whether `inputs` are traced by a jax2onnx conversion in progress."""
    if "jax2onnx" not in sys.modules:
        return False
    if not any(
        isinstance(x, jax.core.Tracer)
        for x in jax.tree_util.tree_leaves(inputs)
    ):
        return False
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("jax2onnx."):
            return True
        frame = frame.f_back
    return False


def converted(layer_name, run, fn):
    """`run` (the layer's runner of `fn`), checked first and run with
    Flax's pooling functions taking their documented arguments."""

    def run_converted(*args, training, **options):
        with _positional_pools():
            check(layer_name, fn, *args, training=training)
            return run(*args, training=training, **options)

    return run_converted


@contextlib.contextmanager
def _positional_pools():
    swapped = {
        place: getattr(*place)
        for place, original in _POOLS.items()
        if getattr(*place) is not original
    }
    for (owner, attr), replacement in swapped.items():
        setattr(owner, attr, _by_keyword(replacement))
    try:
        yield
    finally:
        for (owner, attr), replacement in swapped.items():
            setattr(owner, attr, replacement)


def _by_keyword(pool):
    def avg_pool(inputs, window_shape, strides=None, padding="VALID", **rest):
        return pool(
            inputs,
            window_shape=window_shape,
            strides=strides,
            padding=padding,
            **rest,
        )

    return avg_pool


def check(layer_name, fn, *args, training):
    """Raises naming the operations of `fn(*args)` jax2onnx cannot convert."""
    from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY

    closed = jax.make_jaxpr(functools.partial(fn, training=training))(*args)
    missing = sorted(set(primitives(closed.jaxpr)) - set(PLUGIN_REGISTRY))
    if missing:
        raise NotImplementedError(
            _errors.onnx_unconvertible(layer_name, missing)
        )


def primitives(jaxpr):
    """The names of the primitives in `jaxpr` and the programs it nests."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(item, "jaxpr", item)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    yield from primitives(inner)
