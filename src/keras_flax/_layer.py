"""ModelLayer: the Keras lifecycle around a `Model` (see `_model`).

Data flows one way: `model.init` -> PyTrees of arrays -> Keras variables
(`_weights.Weights`, planned by `_weights.plan`) -> their values ->
`model.apply` -> outputs and new state -> assigned back. The layer is
Keras' protocol alone: what it holds, and how that changes, is a
`_holding.Holding`; how it calls the model, a `_calls.Calls`. It never asks
what kind of model it holds; `JaxLayer` and `FlaxLayer` only make the
`Model` and name the public attributes.
"""

import functools
from typing import Any

import keras

from keras_flax import _backends
from keras_flax import _calls
from keras_flax import _checks
from keras_flax import _holding
from keras_flax import _inputs
from keras_flax import _private
from keras_flax import _quantize
from keras_flax import _summary
from keras_flax import _user_code
from keras_flax import _weights
from keras_flax import _wrt
from keras_flax._model import Model
from keras_flax._model import PyTree


class ModelLayer(keras.layers.Layer):
    """A Keras layer holding a `Model`'s weights and calling it.

    Args:
        model: the `Model`.
        seed: int seed of the RNG given to `model.init` and `model.apply`.
        native_serialization_platforms: platforms `jax2tf` compiles for on
            the TensorFlow backend (None: the platform in use).
        pack_weights: hold the leaves of each dtype in one flat variable.
        wrt: the filter of the parameters that train (see `_wrt`), where
            the model has `FineTuning`; None for all.
        quantization_config: the `keras.quantizers.QuantizationConfig` (or
            its config) a quantized layer was saved with; with a quantized
            `dtype` policy, the layer is quantized when built.
        **kwargs: Keras layer arguments.
    """

    def __init__(
        self,
        model: Model,
        seed: int | None = None,
        native_serialization_platforms: list[str] | None = None,
        pack_weights: bool = False,
        wrt: Any = None,
        quantization_config: Any = None,
        **kwargs: Any,
    ) -> None:
        trains = _wrt.predicate(wrt, model.fine_tuning, model.diagnostics.label)
        policy_given = _weights.policy_given(kwargs.get("dtype"))
        super().__init__(**kwargs)
        if isinstance(quantization_config, dict):
            quantization_config = keras.saving.deserialize_keras_object(
                quantization_config
            )
        self.quantization_config = quantization_config
        self._is_quantized = False
        self.seed = seed
        self.pack_weights = pack_weights
        self.jax2tf_native_serialization_platforms = (
            native_serialization_platforms
        )
        self.seed_generator = None
        if model.rng.call is not None:
            self.seed_generator = keras.random.SeedGenerator(seed)
        self._input_record = None  # the inputs of the first call
        self._held = _holding.Holding(
            self,
            model,
            packed=pack_weights,
            wrt=wrt,
            trains=trains,
            policy_given=policy_given,
        )
        self._calls = _calls.Calls(
            self._forward,
            self.seed_generator,
            native_serialization_platforms,
            self.name,
            self.quantization_mode,
        )

    @property
    def params(self) -> Any:
        """The trainable weights: a PyTree of Keras variables, or None."""
        return self._held.view(self._held.weights.params.tree)

    @property
    def state(self) -> Any:
        """The non-trainable state: a PyTree of Keras variables, or None."""
        return self._held.view(self._held.weights.state.tree)

    @property
    def layers(self) -> list[Any]:
        """The wrapped module's submodules, as
        `model.summary(expand_nested=True)` prints them.

        `_summary.Row`s, nested: each submodule's path, class, parameter
        count (its non-trainable part told) and output shape where known;
        the rows of one level add up to the row above, the top ones to
        `count_params()`. Empty for a model without submodules known, for
        an unbuilt layer, and where Keras' summary reads what rows do not
        have (`_private.NESTED_SUMMARY`): the layer is then one row.
        """
        structure, built = self._model.structure, self._weights.spec
        if structure is None or built is None or not _private.NESTED_SUMMARY:
            return []
        leaf_sizes = self._weights.leaf_sizes()
        return _summary.rows(
            self._held.submodules(),
            _summary.weights(structure, leaf_sizes, self.trainable),
        )

    @property
    def tracked_params(self) -> list:
        """The trainable weights' Keras variables, flat (as the built-in
        `keras.layers.JaxLayer` lists them; packs where packed)."""
        return list(self._weights.params.variables)

    @property
    def tracked_state(self) -> list:
        """The non-trainable state's Keras variables, flat."""
        return list(self._weights.state.variables)

    @property
    def _model(self) -> Model:
        """The `Model` held (`_holding`), without its trees."""
        return self._held.model

    @property
    def _weights(self) -> Any:
        """The model's `_weights.Weights` (`_holding`)."""
        return self._held.weights

    @property
    def _runner(self) -> Any:
        """The backend's runner of the forward pass (`_calls`)."""
        return self._calls.runner

    # Keras lifecycle.

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = args[0] if args else kwargs.get("inputs")
        if not self.built:
            self._input_record = _inputs.record(inputs, self.compute_dtype)
        elif self._weights.spec is not None:
            _checks.inputs_fit(inputs, self._weights.spec, self.name)
        return super().__call__(*args, **kwargs)

    @_user_code.raises_user_errors
    def build(self, input_shape: Any) -> None:
        spec = self._input_record
        if spec is None:
            spec = _inputs.from_shape(input_shape, self.compute_dtype)
        self._held.build(spec, self.seed)
        self._input_record = None
        # A runner for the model built (the inputs may complete it).
        self._calls.runner = self._calls.make_runner(self.quantization_mode)
        if self.quantization_mode is not None and not self._is_quantized:
            # A quantized layer loaded: built float, quantized, then filled
            # by the weights file.
            self._quantize_weights(
                self.quantization_mode, self.quantization_config
            )

    def get_build_config(self) -> Any:
        config: dict[str, Any] | None = super().get_build_config()
        if config is not None:
            config.update(self._weights.build_config())
        return config

    def build_from_config(self, config: dict[str, Any]) -> None:
        if config and "unused_leaves" in config:
            self._weights.unused = _weights.unused_from_config(
                config["unused_leaves"]
            )
        if config and "input_dtypes" in config and "input_shape" in config:
            self._input_record = _inputs.from_shape(
                config["input_shape"],
                self.compute_dtype,
                config["input_dtypes"],
            )
        super().build_from_config(config)

    def call(self, inputs: PyTree, training: bool = False) -> Any:
        return self._run(inputs, training, remat=False)

    def rematerialized_call(
        self, layer_call: Any, *args: Any, **kwargs: Any
    ) -> Any:
        """Under `keras.RematScope` on JAX, the pure forward pass is
        checkpointed, with `training` static; the seed is drawn outside
        the checkpoint, as a Keras state update must be."""
        remat_call = super().rematerialized_call(layer_call, *args, **kwargs)
        if (
            remat_call is layer_call
            or layer_call != self.call
            or _backends.name() != "jax"
        ):
            return remat_call
        return functools.partial(self._run, remat=True)

    @_user_code.raises_user_errors
    def _run(
        self, inputs: PyTree, training: bool = False, *, remat: bool
    ) -> Any:
        # A frozen layer runs in inference mode, as Keras' own frozen
        # `BatchNormalization` does: its state (batch statistics, RNG
        # counts) stays as it is, and dropout is off.
        training = bool(training) and self.trainable
        held, policy = self._held, self.dtype_policy
        return self._calls.run(
            held.model, held.weights, inputs, training, remat, policy
        )

    @_user_code.raises_user_errors
    def compute_output_spec(
        self, inputs: PyTree, training: bool = False
    ) -> Any:
        """The outputs' shapes, without running the model (`_calls`)."""
        return self._calls.output_spec(
            self._model,
            self._weights,
            inputs,
            training,
            self.dtype_policy,
            lambda: super(ModelLayer, self).compute_output_spec(
                inputs, training=training
            ),
        )

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The pure forward pass (`_weights.forward`) of what the layer
        holds when traced: `(params, state, seed, inputs, training)`."""
        held = self._held
        return _weights.forward(held.model, held.weights, *args, **kwargs)

    # Quantization (Keras' protocol; see `_quantize`).

    def quantize(
        self,
        mode: str | None = None,
        type_check: bool = True,
        config: Any = None,
    ) -> None:
        """Quantizes the wrapped module's weights with Qwix, as
        `model.quantize(mode)` asks: the quantized weights (integers and
        their scales, named by Flax path) replace the float ones; those of
        the operations Qwix leaves float (convolutions, LoRA adapters)
        stay, and still train.

        Args:
            mode: `"int8"`, `"int4"` or `"float8"` (None: `config`'s).
            type_check: unused; the layer quantizes its module as a whole.
            config: a `keras.quantizers.QuantizationConfig` (Keras' int8
                and int4 configs: the activations' quantizer, int4's
                `block_size`).

        Raises:
            NotImplementedError: the model has nothing Qwix quantizes, the
                mode has no Qwix form, or the backend is not JAX (Keras'
                `model.quantize` warns and goes on).
            ValueError: an unbuilt or already quantized layer, an unknown
                mode, or Qwix refuses the module in this mode.
            ImportError: Qwix is not installed.
        """
        del type_check
        # Checked here too: Keras 3.16's `layer.quantize` is this alone.
        mode = _checks.quantizable(
            self.name,
            mode or getattr(config, "mode", None),
            self.built,
            self._is_quantized,
            self.dtype_policy.name,
        )
        self._quantize_weights(mode, config)

    def _quantize_weights(self, mode: str, config: Any) -> None:
        self._held.quantize(mode, config)  # on a refusal, nothing changes
        self._is_quantized = True
        self.quantization_config = config
        if self.dtype_policy.quantization_mode is None:
            self.dtype_policy = _quantize.policy_name(
                mode, config, self.dtype_policy.name
            )
        # A runner for the quantized model (ONNX conversion refuses it).
        self._calls.runner = self._calls.make_runner(self.quantization_mode)

    def quantized_call(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)  # as the float module was

    # Serialization.

    def set_weights(self, weights: list[Any]) -> None:
        # Keras' `set_weights`, given copies of JAX arrays.
        super().set_weights([_weights.owned(w) for w in weights])

    def save_own_variables(self, store: Any) -> None:
        # Leaf by leaf, parameters then state, whichever train and however
        # they are packed: the files are the same.
        for i, value in enumerate(self._weights.leaf_values()):
            store[str(i)] = value
        self._calls.save(store)

    def load_own_variables(self, store: Any) -> None:
        self._weights.load(self.name, self._calls.load(store))

    def get_config(self) -> dict[Any, Any]:
        config = {
            "seed": self.seed,
            "pack_weights": self.pack_weights,
            "native_serialization_platforms": (
                self.jax2tf_native_serialization_platforms
            ),
            **self._held.config(self._is_quantized),
        }
        if self._is_quantized:
            config["quantization_config"] = keras.saving.serialize_keras_object(
                self.quantization_config
            )
        return {**super().get_config(), **config, **self._model.config()}
