"""`layer_flax_module_wrapper` / `layer_jax_model_wrapper`.

The semantics of the Keras R interface's helpers, in Python: build the
layer, then compose it with `object` by what `object` is.
"""

from collections.abc import Callable
from typing import Any

import jax
import keras
import numpy as np

from keras_flax._errors import describe
from keras_flax._flax_layer import FlaxLayer
from keras_flax._jax_layer import JaxLayer


def _compose(obj: Any, layer: Any) -> Any:
    if obj is None:
        return layer
    if isinstance(obj, keras.Sequential):
        obj.add(layer)
        return obj
    return layer(obj)  # a Keras tensor or an array (_check_object)


def _check_object(helper: Any, obj: Any) -> None:
    """Refuses a bad `object` before any layer is built."""
    ok = obj is None or isinstance(obj, keras.Sequential)
    ok = ok or keras.utils.is_keras_tensor(obj)
    ok = ok or isinstance(obj, (jax.Array, np.ndarray))
    if not ok:
        raise TypeError(bad_compose_object(helper, obj))


def bad_compose_object(helper: Any, obj: Any) -> str:
    return (
        f"`object` of {helper}() must be a keras.Sequential model, a Keras "
        "tensor (e.g. keras.Input(...)), an array, or None. Received: "
        f"object={describe(obj)}. Pass one of those, or call the layer "
        f"yourself: `layer = {helper}(module=...)`."
    )


def layer_flax_module_wrapper(
    object: Any = None,
    module: Any = None,
    method: str | Callable | None = None,
    variables: Any = None,
    **kwargs: Any,
) -> Any:
    """Creates a `FlaxLayer` and composes it with `object`.

    Args:
        object: a `keras.Sequential` model (the layer is added to it, in
            place, and the model is returned), a Keras tensor or an array
            (the layer's output on it is returned), or `None` (the layer is
            returned).
        module: the Flax module, as in `FlaxLayer`.
        method: as in `FlaxLayer`.
        variables: as in `FlaxLayer`.
        **kwargs: further `FlaxLayer` arguments (`seed`, `name`, ...).

    Returns:
        The model, the output tensor, or the layer, by `object`.

    Raises:
        TypeError: `object` is none of a `keras.Sequential` model, a Keras
            tensor, an array or None (before any layer is built); and what
            `FlaxLayer` raises.

    Examples:
        >>> import flax.linen as nn, keras
        >>> model = keras.Sequential([keras.Input((3,))])
        >>> model = layer_flax_module_wrapper(model, module=nn.Dense(2))
        >>> model.output_shape
        (None, 2)
    """
    _check_object("layer_flax_module_wrapper", object)
    layer = FlaxLayer(module, method=method, variables=variables, **kwargs)
    return _compose(object, layer)


def layer_jax_model_wrapper(
    object: Any = None,
    call_fn: Callable | None = None,
    init_fn: Callable | None = None,
    params: Any = None,
    state: Any = None,
    seed: int | None = None,
    **kwargs: Any,
) -> Any:
    """Creates a `JaxLayer` and composes it with `object`.

    Args:
        object: as in `layer_flax_module_wrapper`.
        call_fn: the model's forward function, as in `JaxLayer`.
        init_fn: the function creating the initial weights, as in
            `JaxLayer` (None: `params` and `state` are given).
        params: initial trainable weights (copied), as in `JaxLayer`.
        state: initial non-trainable state (copied), as in `JaxLayer`.
        seed: int seed of the RNG of `init_fn` and `call_fn`.
        **kwargs: further `JaxLayer` arguments (`name`, `dtype`, ...).

    Returns:
        The model, the output tensor, or the layer, by `object`.

    Raises:
        TypeError: `object` is none of a `keras.Sequential` model, a Keras
            tensor, an array or None (before any layer is built).

    Examples:
        >>> import jax.numpy as jnp, keras
        >>> def call_fn(params, inputs):
        ...     return inputs * params["scale"]
        >>> model = keras.Sequential([keras.Input((3,))])
        >>> model = layer_jax_model_wrapper(
        ...     model, call_fn=call_fn, params={"scale": jnp.ones((3,))}
        ... )
        >>> model.output_shape
        (None, 3)
    """
    _check_object("layer_jax_model_wrapper", object)
    layer = JaxLayer(
        call_fn,  # pyright: ignore[reportArgumentType] (None: refused there)
        init_fn=init_fn,
        params=params,
        state=state,
        seed=seed,
        **kwargs,
    )
    return _compose(object, layer)
