"""Operations jax2onnx cannot convert, named at export time.

Keras' `model.export(format="onnx")` on JAX calls the model under
jax2onnx's trace. A layer called there checks its own program against
jax2onnx's registry of converted primitives, so that an operation jax2onnx
lacks is reported with the layer holding it and the fix, instead of as a
bare primitive name once the whole model is traced.
"""

import functools
import inspect
import sys

import jax

from keras_flax import _errors


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
