"""JaxLayer: a model given as JAX functions, `(init_fn, call_fn)`.

The adapter of JAX functions (found through `_kinds`) makes the `Model`;
`_layer.ModelLayer` does the rest.
"""

from collections.abc import Callable
from typing import Any

import keras

from keras_flax import _checks
from keras_flax import _errors
from keras_flax import _kinds
from keras_flax import _serialization
from keras_flax import _signatures
from keras_flax._layer import ModelLayer


@keras.saving.register_keras_serializable(package="keras_flax")
class JaxLayer(ModelLayer):
    """Keras layer that wraps a JAX model given as functions.

    A drop-in for `keras.layers.JaxLayer`: the same arguments, matched by
    name, and the same `params` / `state` attributes. Weights are named
    after their PyTree paths, eager calls are compiled once per input
    signature, and the weights can be created from the real input dtypes.

    `call_fn` takes, by these exact names, `params` (trainable weights),
    `state` (non-trainable state; then it returns `(outputs, new_state)`),
    `rng` (a key, passed in training), `inputs` (required) and `training`.
    `init_fn` takes `rng`, `inputs` (placeholders of the input's shape,
    batch size and dtype) and `training` (always True), and returns
    `params`, or `(params, state)` when `call_fn` takes `state` (the state
    may be None: the layer then holds none, and `call_fn`'s outputs are
    returned without it). Haiku's
    `hk.transform(...)` and `hk.transform_with_state(...)` pairs fit as
    they are.

    Args:
        call_fn: the model's forward function.
        init_fn: the function creating the initial weights at build time.
            If `None`, `params` (and `state`) must be given.
        params: a PyTree of initial trainable weights (copied). With
            `init_fn`, leaves it does not create are kept, frozen.
        state: a PyTree of initial non-trainable state (copied).
        seed: int seed of the RNG passed to `init_fn` and `call_fn`; two
            layers with the same seed initialise and train identically.
        native_serialization_platforms: platforms (`"cpu"`, `"cuda"`,
            `"rocm"`, `"tpu"`) that `jax2tf` compiles for on the TensorFlow
            backend, and so that `model.export` serves on; None for the
            platform in use.
        pack_weights: if True, the leaves of each dtype are held in one
            flat Keras variable ("pack"; trainable and non-trainable apart)
            instead of one variable each, which removes Keras' per-step
            work per variable for modules with many leaves; leaves of more
            than 16,384 values keep a variable of their own. `params` and
            `state` then hold views with the leaves' paths, shapes,
            `value` and `assign`; weights files are the same as without
            packing. Optimizers that treat each variable as a whole
            (`clipnorm`, weight-decay exclusions by name, Adafactor,
            LAMB) see one variable per pack; refused under `ModelParallel`.
        **kwargs: Keras layer arguments (`name`, `dtype`, `trainable`, ...).

    Attributes:
        call_fn: the forward function, as given.
        init_fn: the initialising function, as given (or None).
        call_fn_arguments: the names of `call_fn`'s arguments.
        init_fn_arguments: the names of `init_fn`'s arguments (or None).
        call_fn_has_params: whether `call_fn` takes `params`.
        call_fn_has_state: whether `call_fn` takes `state`.
        seed_generator: the layer's `keras.random.SeedGenerator` (None for
            a model without RNG).

    Call arguments:
        inputs: a JAX array or a PyTree of arrays.
        training: whether the call is in training mode.

    Call returns:
        The outputs of `call_fn`.

    Raises:
        TypeError: `call_fn` or `init_fn` is not callable.
        ValueError: `call_fn` has an argument the protocol cannot fill,
            `call_fn` takes weights but neither `init_fn` nor `params` /
            `state` are given, or (at build) the given weights do not fit
            what `init_fn` creates.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> def call_fn(params, inputs):
        ...     return inputs @ params["w"] + params["b"]
        >>> def init_fn(rng, inputs):
        ...     return {"w": jax.random.normal(rng, (inputs.shape[-1], 2)),
        ...             "b": jnp.zeros((2,))}
        >>> layer = JaxLayer(call_fn, init_fn, seed=0, name="affine")
        >>> layer(jnp.ones((4, 3))).shape
        (4, 2)
        >>> [w.path for w in layer.weights]
        ['affine/b', 'affine/w']
    """

    def __init__(
        self,
        call_fn: Callable,
        init_fn: Callable | None = None,
        params: Any = None,
        state: Any = None,
        seed: int | None = None,
        native_serialization_platforms: list[str] | None = None,
        pack_weights: bool = False,
        **kwargs: Any,
    ) -> None:
        _checks.layer_arguments(type(self).__name__, pack_weights)
        # Checked first: a `call_fn` that is no function is refused there.
        call_arguments, init_arguments = _signatures.jax_layer_arguments(
            call_fn, init_fn
        )
        # A `call_fn` that is no function was refused above.
        kind = _kinds.of(call_fn, "JaxLayer", _errors.describe)
        model = kind.adapt(
            call_fn, call_arguments, init_fn, init_arguments, params, state
        )
        super().__init__(
            model,
            seed=seed,
            native_serialization_platforms=native_serialization_platforms,
            pack_weights=pack_weights,
            **kwargs,
        )
        self.call_fn = call_fn
        self.init_fn = init_fn
        self.call_fn_arguments = tuple(call_arguments)
        self.init_fn_arguments = init_arguments and tuple(init_arguments)
        self.call_fn_has_params = "params" in call_arguments
        self.call_fn_has_state = "state" in call_arguments

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "JaxLayer":
        config = dict(config)
        for arg in ("call_fn", "init_fn"):
            config[arg] = _serialization.deserialize_function(config[arg], arg)
        return cls(**config)
