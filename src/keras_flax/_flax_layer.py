"""FlaxLayer: a Flax module (linen or NNX) adapted to `JaxLayer`.

The adapters (`_linen.LinenModel`, `_nnx.NNXModel`) turn a module into the
`(init_fn, call_fn)` protocol; `FlaxLayer` adds what is Flax-specific on
top of `JaxLayer`: weight names without the implied `params` collection,
RNG streams for linen, `flax_variables`, and keeping an NNX module in sync.
"""

import flax
import flax.linen as nn
import jax.numpy as jnp
import keras
from flax import nnx

from keras_flax import _backends
from keras_flax import _errors
from keras_flax import _inputs
from keras_flax import _jax_layer
from keras_flax import _linen
from keras_flax import _nnx
from keras_flax import _private
from keras_flax import _rng
from keras_flax import _serialization
from keras_flax import _signatures
from keras_flax._jax_layer import JaxLayer


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
        **kwargs: `seed` (int: reproducible initialisation and RNGs; for
            NNX, the module's RNG streams are reseeded from it),
            `pack_weights` (bool: hold all leaves of one dtype in one Keras
            variable; see `JaxLayer`), `native_serialization_platforms`
            (TensorFlow backend) and the Keras layer arguments (`name`,
            `dtype`, `trainable`, ...).

    Call arguments:
        inputs: a JAX array or a PyTree of arrays.
        training: whether the call is in training mode; passed to the
            method when it takes `training`, and for NNX modules it puts
            the module in train mode (`module.train()`) or eval mode.

    Returns:
        The outputs of the method.

    Example:

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

    _initializer_argument = "module"

    def __init__(
        self,
        module,
        method=None,
        variables=None,
        *,
        rng_collections=None,
        **kwargs,
    ):
        self._is_nnx = isinstance(module, nnx.Module)
        if not (self._is_nnx or isinstance(module, nn.Module)):
            raise TypeError(_errors.not_a_module(module))
        base = nnx.Module if self._is_nnx else nn.Module
        target, signature = _signatures.resolve_method(module, method, base)
        if self._is_nnx:
            _check_nnx_arguments(variables, rng_collections)
            model = _nnx.NNXModel(
                module, target, signature.takes_training, kwargs.get("seed")
            )
            init_fn = None
        else:
            model = _linen.LinenModel(
                module, target, signature.takes_training, variables
            )
            init_fn = _linen.run_once(model.init)
        self._module = module
        self.method = method
        self.rng_collections = tuple(
            _rng.CALL_STREAMS if rng_collections is None else rng_collections
        )
        self._model = model
        self._inference_rng = False
        self._recorded_call = None
        super().__init__(
            call_fn=model.apply,
            init_fn=init_fn,
            params=model.params,
            state=model.state,
            **kwargs,
        )

    @classmethod
    def from_nnx(cls, module_class, *args, layer_kwargs=None, **kwargs):
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

        Example:

        >>> from flax import nnx
        >>> layer = FlaxLayer.from_nnx(nnx.Linear, 3, 4, rngs=nnx.Rngs(0))
        >>> layer.get_config()["module"]["class"]
        'flax.nnx.nn.linear:Linear'
        """
        if not (
            isinstance(module_class, type)
            and issubclass(module_class, nnx.Module)
        ):
            raise TypeError(_errors.not_an_nnx_class(module_class))
        layer = cls(module_class(*args, **kwargs), **(layer_kwargs or {}))
        layer._recorded_call = _serialization.RecordedCall(args, kwargs)
        return layer

    # The module, and its variables in Flax's own format.

    @property
    def params(self):
        """The trainable weights: a nested dict of Keras variables.

        For linen, `{"params": {...}}` as `keras.layers.FlaxLayer` has it;
        for NNX, the module's `nnx.Param`s by path.
        """
        return self._pure(super().params)

    @property
    def state(self):
        """The non-trainable weights: a nested dict of Keras variables."""
        return self._pure(super().state)

    def _pure(self, tree):
        if self._is_nnx and tree is not None:
            return nnx.to_pure_dict(tree)
        return tree

    @property
    def module(self):
        """The wrapped module.

        An NNX module holds the layer's values: every value Keras writes
        into the layer's variables (after `fit`, `evaluate`, `predict`, an
        eager call, `load_weights`) is copied into it, so it can be used in
        plain NNX at any point. On TensorFlow and PyTorch, whose
        optimizers write the variables in place (inside graphs, or with
        fused in-place ops), the values are copied in when the module is
        read through this property (or by `sync_module()`).
        """
        if _backends.name() != "jax" or not _private.VARIABLE_HOOKS:
            self.sync_module()
        return self._module

    def sync_module(self):
        """Writes all the layer's current values into the NNX module.

        Needed only after changing the variables' values by other means
        than Keras' `assign`; a no-op for linen modules, which hold no
        values, and inside traced computations.
        """
        if not self._is_nnx or _tracing(self.variables):
            return
        for tree in (self._params_tree, self._state_tree):
            if tree is not None:
                tree.mirror_values()

    @property
    def flax_variables(self):
        """The current variables (copies), in Flax's format.

        For linen, a dict in `Module.init()` format, which `module.apply`
        takes; for NNX, an `nnx.State`, which `nnx.update(module, ...)`
        takes.
        """
        params, state = self._current_values()
        if self._is_nnx:
            return nnx.merge_state(params, state)
        return _linen.variables_in_init_format(params, state)

    def _current_values(self):
        return tuple(
            None
            if tree is None
            else tree.rebuild([_copy(v) for v in tree.values()])
            for tree in (self._params_tree, self._state_tree)
        )

    # JaxLayer hooks.

    def _uses_rng(self):
        return not self._is_nnx

    def _variable_metadata(self, parts):
        return self._model.variable_metadata(parts)

    def _variable_name(self, trainable, parts):
        if self._is_nnx:
            return _nnx.variable_name(parts)
        return parts[1:] if trainable else parts  # "params" is implied

    def _user_trees(self, params, state):
        return [("variables", _linen.variables_in_init_format(params, state))]

    def _misfit_fix(self, arg):
        return (
            "Call the layer on inputs of the shape the variables were made "
            "for, or pass variables=None to initialise new weights."
        )

    def _check_given_weights(self, spec):
        if self._is_nnx:
            self._refuse_lazy_nnx(spec)
            return _jax_layer.no_unused_leaves()
        return super()._check_given_weights(spec)

    def _unused_or_raise(self, spec, expected, check_shapes):
        params, state = self._given_trees()
        if not params and expected[0]:
            raise ValueError(
                _errors.variables_without_params(sorted(state or {}))
            )
        return super()._unused_or_raise(spec, expected, check_shapes)

    def _refuse_lazy_nnx(self, spec):
        """Refuses NNX modules that create variables when first called."""
        name = type(self._module).__name__
        try:
            created = self._model.created_variables(
                *self._current_values(), _inputs.placeholders(spec, 1)
            )
        except Exception as error:
            if _nnx.has_linen_bridge(self._module):
                # A linen module inside that was never initialised.
                raise ValueError(
                    _errors.lazy_nnx_module(name, ["its linen variables"])
                ) from error
            return  # the call will raise the module's own error
        if created:
            raise ValueError(_errors.lazy_nnx_module(name, created))

    def _init_rng(self):
        key = _rng.key_from_seed(self.seed)
        return _rng.stream_keys(key, _rng.INIT_STREAMS)

    def _wants_seed(self, training):
        return self.seed_generator is not None and (
            training or self._inference_rng
        )

    def _rng_from_seed(self, seed):
        if seed is None:
            return {}
        return _rng.stream_keys(seed, self.rng_collections)

    def call(self, inputs, training=False):
        try:
            return super().call(inputs, training)
        except flax.errors.InvalidRngError:
            if training or self._inference_rng:
                raise
            # The module draws randomness in inference too: feed it.
            self._inference_rng = True
            return super().call(inputs, training)

    # Serialization.

    def _model_config(self):
        if self._is_nnx:
            module = self._serialize_nnx()
        else:
            module = _serialization.serialize_module(self._module)
        config = {
            "module": module,
            "method": _serialization.serialize_method(
                self._module, self.method
            ),
        }
        if self.rng_collections != _rng.CALL_STREAMS:
            config["rng_collections"] = list(self.rng_collections)
        return config

    def _serialize_nnx(self):
        if self._recorded_call is None and not hasattr(
            type(self._module), "get_config"
        ):
            raise TypeError(_errors.nnx_not_serializable(self._module))
        return _serialization.serialize_nnx(self._module, self._recorded_call)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        module_config = config.pop("module")
        method = _serialization.deserialize_method(config.pop("method", None))
        call = _serialization.nnx_call(module_config)
        if call is not None:
            module_class, args, kwargs = call
            layer_kwargs = {**config, "method": method}
            return cls.from_nnx(
                module_class, *args, layer_kwargs=layer_kwargs, **kwargs
            )
        module = _serialization.deserialize_module(module_config)
        return cls(module=module, method=method, **config)


def _check_nnx_arguments(variables, rng_collections):
    if variables is not None:
        raise ValueError(_errors.nnx_with_variables(variables))
    if rng_collections is not None:
        raise ValueError(_errors.nnx_with_rng_collections(rng_collections))


def _copy(value):
    return jnp.array(_backends.to_jax(value), copy=True)


def _tracing(variables):
    return not all(_backends.is_concrete(v.value) for v in variables)
