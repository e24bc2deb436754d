"""FlaxLayer: a Flax module, linen or NNX.

The linen or NNX adapter (found through `_kinds`) makes the `Model`;
`_layer.ModelLayer` does the rest. `FlaxLayer` is a `JaxLayer`, as
`keras.layers.FlaxLayer` is.
"""

from collections.abc import Callable
from typing import Any
from typing import cast

import flax.linen as nn
import keras
from flax import nnx

from keras_flax import _backends
from keras_flax import _checks
from keras_flax import _kinds
from keras_flax import _private
from keras_flax import _rng
from keras_flax import _serialization
from keras_flax import _signatures
from keras_flax import _sizes
from keras_flax import _wrt
from keras_flax._errors import describe
from keras_flax._jax_layer import JaxLayer
from keras_flax._layer import ModelLayer
from keras_flax._model import Call

# Attributes set as they are, not wrapped by Keras' attribute tracking: a
# dict of values to assign, a list of filters.
_UNTRACKED = ("flax_variables", "wrt", "_wrt")


@keras.saving.register_keras_serializable(package="keras_flax")
class FlaxLayer(JaxLayer):
    """Keras layer that wraps a Flax module, linen or NNX.

    A drop-in for `keras.layers.FlaxLayer`, which also takes `flax.nnx`
    modules. The module's parameters become trainable Keras weights named
    after their Flax paths (`Dense_0/kernel`, `blocks/0/linear/kernel`);
    every other variable (linen collections such as `batch_stats`; NNX
    batch statistics, RNG state, caches) becomes non-trainable weights,
    updated after each call that changes it. Randomness is fresh at every
    training step, also inside a jitted `fit`.

    Args:
        module: a `flax.linen.Module` or `flax.nnx.Module` instance.
        method: the forward method: `None` for `__call__`, a method name, a
            method of the module, or a function whose first argument is the
            module. It takes the inputs first and, optionally, `training`.
        variables: linen only: initial variables in the format returned by
            `module.init(...)` (copied), or `None` to initialise at build
            time from the inputs' shape and dtype. Leaves the method does
            not create (a pretrained model used through a sub-method) are
            kept as non-trainable weights, unchanged. An NNX module carries
            its own variables.
        rng_collections: linen only: names of the RNG streams fed to the
            module. Default: `("dropout", "params")`, through which any
            stream the module asks for works.
        wrt: the parameters `fit` trains, as a Flax NNX filter: a Variable
            type (`nnx.LoRAParam`; NNX only), `nnx.PathContains("head")`,
            `nnx.Any` / `nnx.All` / `nnx.Not`, a string (a tag), a list
            (any of them), or a function `(path, value) -> bool`. It is
            given each NNX `nnx.Param`'s path and Variable, as
            `nnx.Optimizer(model, tx, wrt=...)` is, or each linen
            parameter's path inside `params` and its array. The others are
            non-trainable weights of the same names. Default (None): every
            parameter.
        **kwargs: `seed` (int: reproducible initialisation and RNGs; for
            NNX, the module's RNG streams are reseeded from it),
            `pack_weights` (bool: hold all leaves of one dtype in one Keras
            variable; see `JaxLayer`), `native_serialization_platforms`
            (TensorFlow backend) and the Keras layer arguments (`name`,
            `dtype`, `trainable`, ...). Without a `dtype` (and under Keras'
            default global policy) the module's own float dtypes are kept:
            `param_dtype=jnp.bfloat16` gives bfloat16 weights.

    Attributes:
        method: the forward method, as given.
        seed_generator: the layer's `keras.random.SeedGenerator` (None for
            a module without RNG).

    Call arguments:
        inputs: a JAX array or a PyTree of arrays.
        training: whether the call is in training mode; passed to the
            method when it takes `training`, and for NNX modules it puts
            the module in train mode (`module.train()`) or eval mode.

    Call returns:
        The outputs of the method.

    Raises:
        TypeError: `module` is not a Flax module instance (a class: use
            `from_nnx`; an Equinox module or a function: the message names
            the layer to use), or `method`, `wrt` or another argument has
            the wrong kind.
        ValueError: `method` cannot take the inputs, `variables` or
            `rng_collections` are given for an NNX module, `wrt` selects
            no parameter, or (at build) the given variables do not fit the
            inputs, or the module fails on them: the message names the
            input spec and the fix.

    Examples:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> layer = FlaxLayer(nn.Dense(4), seed=0, name="dense")
        >>> layer(jnp.ones((2, 3))).shape
        (2, 4)
        >>> sorted(w.path for w in layer.weights)
        ['dense/bias', 'dense/kernel']
        >>> out = nn.Dense(4).apply(layer.flax_variables, jnp.ones((2, 3)))

        With NNX:

        >>> from flax import nnx
        >>> layer = FlaxLayer(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), name="linear")
        >>> sorted(w.path for w in layer.weights)
        ['linear/bias', 'linear/kernel']
    """

    def __init__(
        self,
        module: nn.Module | nnx.Module,
        method: str | Callable | None = None,
        variables: Any = None,
        *,
        rng_collections: tuple[str, ...] | None = None,
        wrt: Any = None,
        **kwargs: Any,
    ) -> None:
        _checks.layer_arguments(
            type(self).__name__, kwargs.get("pack_weights", False)
        )
        kind = _kinds.of(module, "FlaxLayer", _kinds.not_a_flax_module)
        target, signature = _signatures.resolve_method(
            _kinds.owner(module), method, kind.module_type
        )
        model = kind.adapt(
            module,
            target,
            signature.takes_training,
            variables=variables,
            rng_collections=rng_collections,
            seed=kwargs.get("seed"),
        )
        self.rng_collections = tuple(
            _rng.CALL_STREAMS if rng_collections is None else rng_collections
        )
        # `JaxLayer.__init__` takes functions: the model is made here.
        ModelLayer.__init__(self, model, wrt=wrt, **kwargs)
        self.method = method
        self.init_fn = model.init
        # As `keras.layers.FlaxLayer` describes its generated functions.
        training = ("training",) if signature.takes_training else ()
        self.call_fn_arguments = ("params", "state", "rng", "inputs", *training)
        self.call_fn_has_params = True
        self.call_fn_has_state = True
        self.init_fn_arguments = None
        if model.init is not None:
            self.init_fn_arguments = ("rng", "inputs", *training)

    @classmethod
    def from_nnx(
        cls,
        module_class: type,
        *args: Any,
        layer_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> "FlaxLayer":
        """Builds `module_class(*args, **kwargs)` and wraps it, saveably.

        The constructor call is recorded, so that `model.save("m.keras")`
        and `keras.saving.load_model` rebuild the module (its values come
        from the file). `nnx.Rngs` arguments are saved by their stream
        names; other arguments as in linen module fields.

        Args:
            module_class: a `flax.nnx.Module` class.
            *args: positional arguments of the constructor.
            layer_kwargs: a dict of `FlaxLayer` arguments (`method`,
                `name`, `seed`, ...).
            **kwargs: keyword arguments of the constructor.

        Returns:
            The `FlaxLayer`.

        Raises:
            TypeError: `module_class` is not an NNX module class, or a
                layer argument (`name`, ...) is given among the
                constructor's arguments, which do not take it (give it in
                `layer_kwargs`).

        Examples:
            >>> from flax import nnx
            >>> layer = FlaxLayer.from_nnx(nnx.Linear, 3, 4, rngs=nnx.Rngs(0))
            >>> layer.get_config()["module"]["class"]
            'flax.nnx.nn.linear:Linear'
        """
        _checks.nnx_class(module_class)
        _checks.no_layer_arguments(
            cls, module_class, kwargs, "FlaxLayer.from_nnx"
        )
        if _sizes.find(layer_kwargs, {}):
            raise ValueError(
                input_dim_in_layer_kwargs(sorted(layer_kwargs or {}))
            )
        # The adapter constructs the module (at build where its sizes
        # follow the input), and the config records the call.
        call = Call(module_class, args, kwargs)
        return cls(cast(Any, call), **(layer_kwargs or {}))

    @staticmethod
    def input_dim(axis: int = -1) -> Any:
        """A size `from_nnx` takes from the input when the layer is built.

        `FlaxLayer.from_nnx(nnx.Linear, FlaxLayer.input_dim(), 10,
        rngs=nnx.Rngs(0))` constructs `nnx.Linear(d, 10, rngs=...)` at
        build, `d` the size of the input's last axis: the same code builds
        for `keras.Input((20,))` and `keras.Input((30,))`, as
        `keras.layers.Dense(10)` does. It may stand for any constructor
        argument (inside lists, tuples and dicts too); the config records
        it, so `load_model` constructs the module for the saved input
        shape. Until built, the layer has no weights and `module` is None.

        Args:
            axis: the input's axis (not the batch axis, 0); -1 is the
                last. The input is one array, that axis' size known.

        Returns:
            The placeholder.

        Raises:
            ValueError: `axis` is not an int, or is 0 (the batch axis).

        Examples:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> layer = FlaxLayer.from_nnx(
            ...     nnx.Linear, FlaxLayer.input_dim(), 4, rngs=nnx.Rngs(0)
            ... )
            >>> layer(jnp.ones((2, 3))).shape
            (2, 4)
            >>> layer.module.kernel.shape
            (3, 4)
        """
        return _sizes.InputDim(axis)

    @property
    def module(self) -> nn.Module | nnx.Module | None:
        """The wrapped module.

        An NNX module holds the layer's values: every value Keras writes
        into the layer's variables (after `fit`, `evaluate`, `predict`, an
        eager call, `load_weights`) is copied into it, so it can be used in
        plain NNX at any point. On TensorFlow and PyTorch, whose
        optimizers write the variables in place (inside graphs, or with
        fused in-place ops), the values are copied in when the module is
        read through this property (or by `sync_module()`).

        A module built at Keras build time (one creating its variables on
        its first call) is the user's module, built then; a module sized
        from its input (`input_dim`) is None until then.
        """
        if _backends.name() != "jax" or not _private.VARIABLE_HOOKS:
            self._weights.write_back()
        return self._model.wrapped

    def sync_module(self) -> None:
        """Writes all the layer's current values into the NNX module.

        Needed only after changing the variables' values by other means
        than Keras' `assign`; a no-op for linen modules, which hold no
        values, and inside traced computations.
        """
        self._weights.write_back()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _UNTRACKED:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def call_fn(self) -> Any:
        """The pure forward function `(params, state, rng, inputs,
        training)`, as `keras.layers.FlaxLayer` generates it."""
        return self._model.apply

    @property
    def wrt(self) -> Any:
        """The filter of the parameters that train (None: all), fixed
        when the layer is made."""
        return self._held.wrt

    @wrt.setter
    def wrt(self, value: Any) -> None:
        raise AttributeError(wrt_set(self.name, value))

    @property
    def flax_variables(self) -> Any:
        """The current variables (copies), in Flax's format.

        For linen, a dict in `Module.init()` format, which `module.apply`
        takes; for NNX, an `nnx.State`, which `nnx.update(module, ...)`
        takes.

        Assigning sets every value (a restored checkpoint, say): for linen
        a dict in `Module.init()` format, boxed or not; for NNX an
        `nnx.State` or a pure dict (`nnx.to_pure_dict`), and the NNX module
        is updated too. All values are checked first: on any misfit the
        error names the paths, and nothing is changed.

        Raises:
            ValueError: (assigning) the layer is not built yet, or a leaf
                is missing, unknown, mis-shaped, of another kind of dtype,
                or not an array.
        """
        user_format = self._model.user_format
        assert user_format is not None  # linen and NNX have their format
        return user_format.to_user(*self._weights.current_values())

    @flax_variables.setter
    def flax_variables(self, variables: Any) -> None:
        self._weights.assign_user(self.name, self._model, variables)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FlaxLayer":
        config = dict(config)
        if "wrt" in config:
            config["wrt"] = _wrt.from_config(config["wrt"])
        module = _kinds.rebuilt(config.pop("module"), "FlaxLayer")
        method = _serialization.deserialize_method(config.pop("method", None))
        return cls(module=module, method=method, **config)


def input_dim_in_layer_kwargs(keys: Any) -> str:
    return (
        "`layer_kwargs` are the layer's own arguments, which no input size "
        f"fills. Received: `FlaxLayer.input_dim()` in layer_kwargs {keys}. "
        "Give it among the module's constructor arguments (`*args` and "
        "`**kwargs` of `from_nnx`)."
    )


def wrt_set(layer_name: str, wrt: Any) -> str:
    return (
        f"`wrt` of layer '{layer_name}' is fixed when the layer is made: its "
        "weights are trainable or not from then on. Received: "
        f"layer.wrt = {describe(wrt)}. Fix: make a new layer, "
        "`FlaxLayer(module, wrt=...)`, and copy the values into it once "
        "built: `new.flax_variables = layer.flax_variables`."
    )
