"""EquinoxLayer: an Equinox module.

`_equinox.adapt` makes the `Model` (found through `_kinds`);
`_layer.ModelLayer` does the rest. Equinox is imported only when a layer
is made (the `equinox` extra).
"""

from collections.abc import Callable
from typing import Any

import keras

from keras_flax import _checks
from keras_flax import _kinds
from keras_flax import _serialization
from keras_flax import _sizes
from keras_flax import _wrt
from keras_flax._errors import describe
from keras_flax._layer import ModelLayer
from keras_flax._model import Call


@keras.saving.register_keras_serializable(package="keras_flax")
class EquinoxLayer(ModelLayer):
    """Keras layer that wraps an Equinox module.

    The module's inexact arrays (`eqx.is_inexact_array`) become trainable
    Keras weights named by their tree path (`layers/0/weight`); its other
    arrays, and the `eqx.nn.State` given as `state`, non-trainable ones.
    Static fields stay in the module. By Equinox's convention the method
    is applied per example (`jax.vmap` with `axis_name="batch"`, as
    `eqx.nn.BatchNorm` expects); outside training the module runs in
    inference mode (`eqx.nn.inference_mode`: dropout off, running
    statistics used).

    Args:
        module: an `equinox.Module` instance.
        method: the forward method: None for `__call__`, a method name, or
            a function whose first argument is the module. It takes
            `(module, x, *, key=None)`, or `(module, x, state, *, key=None)
            -> (y, state)` for a stateful module (told apart by the
            argument names); a `key` argument gets a fresh key per
            training step (one per example, split from it).
        state: the `eqx.nn.State` that `eqx.nn.make_with_state` returned
            beside the module, for a stateful one (BatchNorm,
            SpectralNorm); updated after each call in training.
        batched: whether the method takes the whole batch (default False:
            it is applied per example).
        wrt: the parameters `fit` trains, as a Flax NNX filter on their
            paths (`nnx.PathContains("head")`) or a function
            `(path, value) -> bool`; default (None) every parameter.
        seed: int seed of the keys given to the method in training.
        **kwargs: Keras layer arguments (`name`, `dtype`, `trainable`, ...)
            and `pack_weights` (see `JaxLayer`).

    Raises:
        TypeError: `module` is not an Equinox module instance (for a Flax
            module the message names `FlaxLayer`), or `method` is neither
            a name nor a function.
        ValueError: `wrt` selects none of the parameters.

    Examples:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> layer = EquinoxLayer(
        ...     eqx.nn.Linear(3, 2, key=jax.random.key(0)), name="linear"
        ... )
        >>> layer(jnp.ones((4, 3))).shape
        (4, 2)
        >>> sorted(w.path for w in layer.weights)
        ['linear/bias', 'linear/weight']
    """

    def __init__(
        self,
        module: Any,
        method: str | Callable | None = None,
        *,
        state: Any = None,
        batched: bool = False,
        wrt: Any = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        _checks.layer_arguments(
            type(self).__name__, kwargs.get("pack_weights", False)
        )
        kind = _kinds.of(module, "EquinoxLayer", not_an_equinox_module)
        model = kind.adapt(module, method, state=state, batched=batched)
        super().__init__(model, seed=seed, wrt=wrt, **kwargs)
        self.method = method
        self.batched = batched

    @classmethod
    def from_constructor(
        cls,
        module_class: type,
        *args: Any,
        layer_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> "EquinoxLayer":
        """Builds `module_class(*args, **kwargs)` and wraps it, saveably.

        The module is built through `eqx.nn.make_with_state`, so stateful
        classes get their state. The constructor call is recorded, so that
        `model.save("m.keras")` and `keras.saving.load_model` rebuild the
        module (its values come from the file; a `key` argument is saved
        as a key, any key).

        Args:
            module_class: an `equinox.Module` class.
            *args: positional arguments of the constructor.
            layer_kwargs: a dict of `EquinoxLayer` arguments (`method`,
                `name`, `seed`, `batched`, ...).
            **kwargs: keyword arguments of the constructor.

        Returns:
            The `EquinoxLayer`.

        Raises:
            TypeError: `module_class` is not an Equinox module class.

        Examples:
            >>> import equinox as eqx, jax, jax.numpy as jnp
            >>> layer = EquinoxLayer.from_constructor(
            ...     eqx.nn.Linear, 3, 2, key=jax.random.key(0)
            ... )
            >>> layer(jnp.ones((4, 3))).shape
            (4, 2)
            >>> layer.get_config()["module"]["class"]
            'equinox.nn:Linear'
        """
        if _sizes.find(args, kwargs):
            raise TypeError(
                "`FlaxLayer.input_dim()` sizes an NNX module from its input "
                "(`FlaxLayer.from_nnx`); `EquinoxLayer.from_constructor` "
                f"constructs {getattr(module_class, '__name__', module_class)}"
                " at once and cannot take it. Received: an input_dim "
                "placeholder among the constructor's arguments. Pass the "
                "size itself."
            )
        # The adapter constructs the module (`eqx.nn.make_with_state`), and
        # the config records the call.
        call = Call(module_class, args, kwargs)
        _kinds.of(
            call,
            "EquinoxLayer",
            lambda _: not_an_equinox_class(module_class),
        )
        _checks.no_layer_arguments(
            cls, module_class, kwargs, "EquinoxLayer.from_constructor"
        )
        return cls(call, **(layer_kwargs or {}))

    @property
    def module(self) -> Any:
        """The module holding the layer's current values (`eqx.combine`
        of the trained arrays with the static parts)."""
        made = self._model.wrapped
        params, held = self._weights.current_values()
        return made.combined(params, held)

    @property
    def eqx_state(self) -> Any:
        """The `eqx.nn.State` holding the layer's current state, or None."""
        made = self._model.wrapped
        _, held = self._weights.current_values()
        return made.state_with(held)

    @property
    def wrt(self) -> Any:
        """The filter of the parameters that train (None: all)."""
        return self._held.wrt

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "EquinoxLayer":
        config = dict(config)
        if "wrt" in config:
            config["wrt"] = _wrt.from_config(config["wrt"])
        module = _kinds.rebuilt(config.pop("module"), "EquinoxLayer")
        method = _serialization.deserialize_method(config.pop("method", None))
        return cls(module, method=method, **config)


def not_an_equinox_module(module: Any) -> str:
    fix = "Pass an `equinox.Module` instance."
    if isinstance(module, type):
        fix = (
            f"To wrap an Equinox Module class, instantiate it, or let the "
            f"layer do it: EquinoxLayer.from_constructor({module.__name__}, "
            "..., key=jax.random.key(0))."
        )
    return (
        "`module` of EquinoxLayer must be an equinox.Module instance. "
        f"Received: module={describe(module)}. {fix}"
    )


def not_an_equinox_class(module_class: type) -> str:
    return (
        "`module_class` of EquinoxLayer.from_constructor must be an "
        f"equinox.Module class. Received: module_class={describe(module_class)}"
        ". Fix: pass the class and its constructor arguments: "
        "`EquinoxLayer.from_constructor(MLP, 4, 2, key=jax.random.key(0))`."
    )
