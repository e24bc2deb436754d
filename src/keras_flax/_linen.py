"""FlaxLayer: a Flax linen module adapted to the `JaxLayer` protocol.

`LinenModel` turns a module and its forward method into `init_fn(rng,
inputs)` and `call_fn(params, state, rng, inputs, training)`; `FlaxLayer`
adds what is Flax-specific on top of `JaxLayer`: names without the implied
`params` collection, RNG streams, and `flax_variables`.
"""

import collections.abc
import inspect

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras

from keras_flax import _errors, _rng, _serialization, _signatures
from keras_flax._jax_layer import JaxLayer

# Collections never held as state: what modules `sow`.
_NEVER_STATE = ("params", "intermediates")


def _is_sown(collection):
    """Whether a collection holds `sow` output: tuples of values."""
    leaves = jax.tree_util.tree_flatten_with_path(collection)[0]
    return bool(leaves) and all(
        any(isinstance(k, jax.tree_util.SequenceKey) for k in path)
        for path, _ in leaves
    )


class LinenModel:
    """A linen module and method as `init_fn` and `call_fn`."""

    def __init__(self, module, method, takes_training):
        self.module = module
        self.method = method  # None, a method name or a function
        self.takes_training = takes_training
        self.sown = set()

    def split(self, variables):
        """`Module.init` output -> `(params, state)` as `JaxLayer` holds them.

        `params` keeps its collection key (`{"params": ...}`), as
        `keras.layers.FlaxLayer` does; boxed partitioning metadata is
        unwrapped and sown collections are dropped.
        """
        variables = dict(nn.meta.unbox(flax.core.unfreeze(variables)))
        self.sown |= {k for k, v in variables.items() if _is_sown(v)}
        params = (
            {"params": variables["params"]} if "params" in variables else {}
        )
        state = {
            k: v
            for k, v in variables.items()
            if k not in _NEVER_STATE and k not in self.sown
        }
        return params, state

    def _training_kwargs(self, training):
        return {"training": training} if self.takes_training else {}

    def init(self, rng, inputs):
        variables = self.module.init(
            rng, inputs, method=self.method, **self._training_kwargs(True)
        )
        return self.split(variables)

    def apply(self, params, state, rng, inputs, training):
        outputs, mutated = self.module.apply(
            {**params, **state},
            inputs,
            rngs=rng,
            method=self.method,
            mutable=nn.DenyList([*_NEVER_STATE, *sorted(self.sown)]),
            **self._training_kwargs(training),
        )
        return outputs, {name: mutated.get(name, state[name]) for name in state}


def _defined_methods(module):
    base = set(dir(nn.Module))
    names = [
        name
        for name in dir(type(module))
        if name not in base
        and not name.startswith("_")
        and callable(getattr(type(module), name, None))
    ]
    if type(module).__call__ is not nn.Module.__call__:
        names.insert(0, "__call__")
    return names


def resolve_method(module, method):
    """`method` -> (what Flax's `apply` takes, signature of the method)."""
    cls_name = type(module).__name__
    if method is None:
        fn, flax_method, name, skip = module.__call__, None, "__call__", False
    elif isinstance(method, str):
        if not callable(getattr(type(module), method, None)):
            raise ValueError(
                _errors.unknown_method(module, method, _defined_methods(module))
            )
        fn, flax_method, name, skip = (
            getattr(module, method),
            method,
            method,
            False,
        )
    elif inspect.ismethod(method) and isinstance(method.__self__, nn.Module):
        fn, name, skip = method, method.__name__, False
        on_class = getattr(type(module), name, None) is method.__func__
        flax_method = name if on_class else method.__func__
    elif callable(method):
        fn, flax_method, skip = method, method, True
        name = getattr(method, "__name__", repr(method))
    else:
        raise TypeError(_errors.bad_method_type(method))
    if skip:
        label, prefix = name, f"{name}(module, "
    else:
        label = f"{cls_name}.{name}"
        prefix = "module(" if name == "__call__" else f"module.{name}("
    signature = _signatures.method_signature(fn, label, prefix, skip)
    return flax_method, signature


def _checked_variables(variables):
    if not isinstance(variables, collections.abc.Mapping) or not all(
        isinstance(v, collections.abc.Mapping) for v in variables.values()
    ):
        raise TypeError(_errors.variables_not_mapping(variables))
    return variables


@keras.saving.register_keras_serializable(package="keras_flax")
class FlaxLayer(JaxLayer):
    """Keras layer that wraps a Flax linen module.

    A drop-in for `keras.layers.FlaxLayer`. The module's `"params"` become
    trainable Keras weights named after their Flax paths
    (`Dense_0/kernel`); every other collection (`batch_stats`, ...) becomes
    non-trainable weights, updated after each call that changes it. RNG
    streams get fresh keys at every training step, also inside a jitted
    `fit`, and the weights can go back to plain Flax through
    `flax_variables`.

    Args:
        module: a `flax.linen.Module` instance.
        method: the forward method: `None` for `__call__`, a method name, a
            method of the module, or a function whose first argument is the
            module. It takes the inputs first and, optionally, `training`.
        variables: initial variables in the format returned by
            `module.init(...)` (copied), or `None` to initialise at build
            time from the inputs' shape and dtype.
        rng_collections: names of the RNG streams fed to the module at
            each call. Default: `("dropout", "params")`, through which any
            stream the module asks for works.
        **kwargs: `seed` (int: reproducible initialisation and RNGs) and
            the Keras layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: a JAX array or a PyTree of arrays.
        training: whether the call is in training mode; passed to the
            method when it takes `training`.

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
    """

    def __init__(
        self,
        module,
        method=None,
        variables=None,
        *,
        rng_collections=None,
        **kwargs,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(_errors.not_a_module(module))
        flax_method, signature = resolve_method(module, method)
        model = LinenModel(module, flax_method, signature.takes_training)
        params = state = None
        if variables is not None:
            params, state = model.split(_checked_variables(variables))
        self.module = module
        self.method = method
        self.rng_collections = tuple(
            _rng.CALL_STREAMS if rng_collections is None else rng_collections
        )
        self._model = model
        self._inference_rng = False
        super().__init__(
            call_fn=model.apply,
            init_fn=jax.jit(model.init),
            params=params,
            state=state,
            **kwargs,
        )

    @property
    def flax_variables(self):
        """The current variables, in `Module.init()` format (copies)."""
        values = {}
        for tree in (self._params_tree, self._state_tree):
            if tree is not None:
                values.update(
                    tree.rebuild([jnp.copy(v) for v in tree.values()])
                )
        return values

    def _uses_rng(self):
        return True

    def _variable_name(self, trainable, parts):
        return parts[1:] if trainable else parts

    def _user_trees(self, params, state):
        return [("variables", {**(params or {}), **(state or {})})]

    def _misfit_fix(self, arg):
        return (
            "Call the layer on inputs of the shape the variables were made "
            "for, or pass variables=None to initialise new weights."
        )

    def _raise_if_misfit(self, spec, expected):
        if not self.params and expected[0]:
            raise ValueError(
                _errors.variables_without_params(sorted(self.state or {}))
            )
        super()._raise_if_misfit(spec, expected)

    def _init_rng(self):
        key = _rng.key_from_seed(self.seed)
        return _rng.stream_keys(key, _rng.INIT_STREAMS)

    def _call_seed(self, training):
        if training or self._inference_rng:
            return self.seed_generator.next()
        return None

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

    def _model_config(self):
        config = {
            "module": _serialization.serialize_module(self.module),
            "method": _serialization.serialize_method(self.module, self.method),
        }
        if self.rng_collections != _rng.CALL_STREAMS:
            config["rng_collections"] = list(self.rng_collections)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        module = _serialization.deserialize_module(config.pop("module"))
        method = _serialization.deserialize_method(
            module, config.pop("method", None)
        )
        return cls(module=module, method=method, **config)
