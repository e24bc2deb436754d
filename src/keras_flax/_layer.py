"""ModelLayer: the Keras lifecycle around a `Model` (see `_model`).

Data flows one way: `model.init` -> PyTrees of arrays -> Keras variables
(`_weights.Weights`, planned by `_weights.plan`) -> their values ->
`model.apply` -> outputs and new state -> assigned back. The layer never
asks what kind of model it holds; `JaxLayer` and `FlaxLayer` only make the
`Model` and name the public attributes.
"""

import dataclasses
import functools
from typing import Any

import jax
import keras

from keras_flax import _backends
from keras_flax import _checks
from keras_flax import _inputs
from keras_flax import _onnx
from keras_flax import _output_specs
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
        self._trains = _wrt.predicate(
            wrt, model.fine_tuning, model.diagnostics.label
        )
        # A dtype policy given to the layer, or a global one other than the
        # default, decides the float storage; else the module's own dtypes
        # are kept (a `param_dtype=bfloat16` module holds bfloat16).
        self._policy_given = _weights.policy_given(kwargs.get("dtype"))
        super().__init__(**kwargs)
        if isinstance(quantization_config, dict):
            quantization_config = keras.saving.deserialize_keras_object(
                quantization_config
            )
        self.quantization_config = quantization_config
        self._model = model
        # As given (Keras would wrap a list of filters in its own type).
        object.__setattr__(self, "_wrt", wrt)
        self.seed = seed
        self.pack_weights = pack_weights
        self.jax2tf_native_serialization_platforms = (
            native_serialization_platforms
        )
        self.seed_generator = None
        if model.rng.call is not None:
            self.seed_generator = keras.random.SeedGenerator(seed)
        # Whether the model asked for randomness outside training.
        self._inference_rng = False
        self._input_record = None
        self._built_spec = None
        self._submodules = None  # the model's submodules, once asked for
        self._axes = dict(model.axes)
        self._runner = self._make_runner()
        # Given leaves the model does not use, as a saved layer had them.
        self._saved_unused = _weights.no_unused()
        self._weights = _weights.Weights.empty(self)
        # Given trees waiting for build to be packed (packing needs to know
        # which leaves train), as arrays; else made variables now, as the
        # built-in layers do.
        self._given = None
        if model.params is not None or model.state is not None:
            if pack_weights and model.init is not None:
                self._given = _Untracked((model.params, model.state))
            else:
                self._weights = self._create(
                    _weights.given(
                        model, model.params, model.state, self._left_out
                    )
                )
            # The variables (or the plan) hold the given weights now:
            # nothing else keeps them.
            self._model = model.replace(params=None, state=None)

    @property
    def params(self) -> Any:
        """The trainable weights: a PyTree of Keras variables, or None."""
        return self._view(self._weights.params.tree)

    @property
    def state(self) -> Any:
        """The non-trainable state: a PyTree of Keras variables, or None."""
        return self._view(self._weights.state.tree)

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
        structure = self._model.structure
        spec = self._built_spec
        if structure is None or spec is None or not _private.NESTED_SUMMARY:
            return []
        if self._submodules is None:
            # Traced once (saving reads `layers` too).
            nodes = structure.nodes(
                *self._weights.shapes(), _backends.symbolic_structs(spec.tree)
            )
            self._submodules = _Untracked(nodes)
        weights = [
            _summary.Weight(
                path=structure.path_of(in_params, parts),
                size=size,
                trainable=trains and self.trainable,
            )
            for in_params, parts, size, trains in self._weights.leaf_sizes()
        ]
        return _summary.rows(self._submodules.value, weights)

    @property
    def tracked_params(self) -> list:
        """The trainable weights' Keras variables, flat (as the built-in
        `keras.layers.JaxLayer` lists them; packs where packed)."""
        return list(self._weights.params.variables)

    @property
    def tracked_state(self) -> list:
        """The non-trainable state's Keras variables, flat."""
        return list(self._weights.state.variables)

    def _make_runner(self) -> Any:
        """The backend's runner of `_forward` (see `_backends`)."""
        runner = _backends.make_runner(
            self._forward,
            self.jax2tf_native_serialization_platforms,
            self.name,
        )
        if _backends.name() == "jax":
            runner = _onnx.guarded(
                self.name,
                runner,
                self._forward,
                quantized=self.quantization_mode,
            )
        return runner

    def _view(self, tree: PyTree) -> Any:
        """A tree of the layer's as the model shows it."""
        user_format = self._model.user_format
        return tree if user_format is None else user_format.view(tree)

    def _left_out(self, params: PyTree) -> frozenset[Any]:
        """The keys of the parameters `wrt` leaves out (none without)."""
        if self._trains is None:
            return frozenset()
        model = self._model
        assert model.fine_tuning is not None  # `_wrt.predicate` refused
        return _wrt.left_out(
            self._wrt,
            self._trains,
            model.diagnostics.label,
            model.fine_tuning.candidates(params),
        )

    def _create(self, plan: _weights.Plan) -> _weights.Weights:
        """The variables of `plan`, in this layer."""
        return _weights.Weights.create(
            self,
            self._model,
            plan,
            packed=self.pack_weights,
            float_dtype=self._float_dtype,
        )

    def _float_dtype(self, dtype: Any) -> Any:
        """The storage dtype of a float leaf of `dtype`."""
        return self.variable_dtype if self._policy_given else dtype

    # Keras lifecycle.

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = args[0] if args else kwargs.get("inputs")
        if not self.built:
            self._input_record = _inputs.record(inputs, self.compute_dtype)
        elif self._built_spec is not None:
            _checks.inputs_fit(inputs, self._built_spec, self.name)
        return super().__call__(*args, **kwargs)

    @_user_code.raises_user_errors
    def build(self, input_shape: Any) -> None:
        spec = self._input_record
        if spec is None:
            spec = _inputs.from_shape(input_shape, self.compute_dtype)
        self._complete(spec)
        left_out = self._left_out
        if self._given is not None:
            trees = self._given.value
        elif self._weights.holds_nothing:
            trees = (None, None)
        else:
            trees = self._weights.shapes()
            # Frozen when made (and a user's `wrt` function is given
            # arrays, not shapes).
            left_out = _nothing_left_out
        plan = _weights.plan(
            self._model,
            spec,
            trees,
            seed=self.seed,
            layer_name=self.name,
            axes=self._axes,
            left_out=left_out,
            saved_unused=self._saved_unused,
        )
        if self._weights.holds_nothing:
            self._weights = self._create(plan)
            self._given = None
        else:
            self._weights.freeze(plan.frozen)
        self._axes = dict(plan.axes)
        self._saved_unused = plan.unused
        self._built_spec = plan.spec
        self._input_record = None
        # The user's module re-pointed at the values as laid out (under a
        # distribution, its shards: no whole copy stays on a device).
        self._weights.write_back()
        mode = self.quantization_mode
        if mode is not None and not getattr(self, "_is_quantized", False):
            # A quantized layer loaded: built float, quantized, then filled
            # by the weights file.
            self._quantize_weights(mode, self.quantization_config)

    def _complete(self, spec: _inputs.Specs) -> None:
        """Completes a model that the inputs complete (`Live.build`: a
        module creating its variables on its first call, or sized from its
        input): its weights replace those held so far."""
        live = self._model.live
        while live is not None and live.build is not None:
            model = live.build(spec, self.name)
            if model is None:
                return
            # Rebuilt by the config of the model the layer was made with.
            self._adopt(model.replace(config=self._model.config))
            live = self._model.live

    def _adopt(
        self, model: Model, frozen: frozenset[str] = frozenset()
    ) -> None:
        """Holds `model`, with the weights it is given (those at `frozen`
        paths, and those `wrt` leaves out, frozen), in place of the model
        and weights held so far."""
        plan = _weights.given(model, model.params, model.state, self._left_out)
        old = self._weights.variables
        self._model = model
        self._weights = self._create(
            dataclasses.replace(plan, frozen=plan.frozen | frozen)
        )
        self._model = model.replace(params=None, state=None)
        for variable in old:
            _private.untrack_variable(self, variable)
        self._axes = dict(model.axes)
        self._submodules = None
        self._runner = self._make_runner()

    def get_build_config(self) -> Any:
        config: dict[str, Any] | None = super().get_build_config()
        if config is not None and self._built_spec is not None:
            config["input_dtypes"] = self._built_spec.dtype_names()
        if config is not None and any(self._saved_unused.values()):
            config["unused_leaves"] = _weights.unused_config(self._saved_unused)
        return config

    def build_from_config(self, config: dict[str, Any]) -> None:
        if config and "unused_leaves" in config:
            self._saved_unused = _weights.unused_from_config(
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
        outputs = _user_code.attempt(self._call, inputs, training, remat)
        if self._feeds_rng_from_now(outputs, training):
            outputs = _user_code.attempt(self._call, inputs, training, remat)
        return _user_code.result(outputs)

    def _feeds_rng_from_now(self, outcome: Any, training: bool) -> bool:
        """Whether `outcome` is the model asking for randomness outside
        training for the first time: then it is fed some from now on, and
        the call is to be made again."""
        asks = isinstance(outcome, _user_code.Refused) and isinstance(
            outcome.error, self._model.rng.inference_error
        )
        if training or self._inference_rng or not asks:
            return False
        self._inference_rng = True
        return True

    def _call(self, inputs: PyTree, training: bool, remat: bool) -> Any:
        if _backends.is_meta(inputs):
            # Keras' shape inference on PyTorch ("meta" tensors): shapes
            # alone, nothing run, no state written.
            spec = self._output_spec(inputs, training)
            return _backends.meta_tensors(spec)
        seed = self._call_seed(bool(training))
        weights = self._weights
        outputs, new_state = self._runner(
            weights.params.values(),
            weights.state.values(),
            seed,
            inputs,
            training=self._static_training(training),
            spec=self._built_spec,
            remat=remat,
        )
        if new_state is not None:
            weights.state.assign(new_state)
        return outputs

    def _static_training(self, training: bool) -> bool:
        """The mode `model.apply` is traced in (one trace per mode only
        where the model sees the mode)."""
        return bool(training) and self._model.takes_training

    def _wants_seed(self, training: bool) -> bool:
        """Whether a call in this mode is given a seed."""
        return self.seed_generator is not None and (
            training or self._inference_rng
        )

    def _call_seed(self, training: bool) -> Any:
        """The seed for this call (None for no RNG), drawn outside `jit`."""
        if self.seed_generator is None or not self._wants_seed(training):
            return None
        return self.seed_generator.next()

    @_user_code.raises_user_errors
    def compute_output_spec(
        self, inputs: PyTree, training: bool = False
    ) -> Any:
        """The outputs' shapes, by `jax.eval_shape` of the forward pass,
        unknown sizes symbolic.

        Where the model refuses symbolic sizes: on JAX, the shapes at sizes
        it accepts (`_output_specs`); on TensorFlow and PyTorch, Keras' own
        way (the layer run on placeholder tensors of two made-up batch
        sizes).
        """
        probe = functools.partial(self._output_spec, training=training)
        specs = _user_code.attempt(probe, inputs)
        if self._feeds_rng_from_now(specs, training):
            specs = _user_code.attempt(probe, inputs)
        if not isinstance(specs, _user_code.Refused):
            return specs
        if _backends.name() != "jax":
            return super().compute_output_spec(inputs, training=training)
        built = self._built_spec
        return _output_specs.at_accepted_sizes(
            lambda x, size: self._output_spec(x, training, size),
            inputs,
            None if built is None else built.size,
            self.name,
            specs,
        )

    def _output_spec(
        self, inputs: PyTree, training: bool, size: int | None = None
    ) -> Any:
        training = bool(training)
        seed = None
        if self._wants_seed(training):
            seed = jax.ShapeDtypeStruct((2,), "uint32")
        # Keras casts float variables to the compute dtype where it differs
        # from the storage dtype (a mixed policy).
        cast_to = None
        if self.compute_dtype != self.variable_dtype:
            cast_to = self.compute_dtype
        return _backends.output_spec(
            self._forward,
            *self._weights.specs(cast_to),
            seed,
            inputs,
            self._static_training(training),
            size=size,
        )

    def _forward(
        self,
        param_values: Any,
        state_values: Any,
        seed: Any,
        inputs: PyTree,
        training: bool,
    ) -> tuple[PyTree, list[Any] | None]:
        """The pure forward pass (`_weights.forward`), jitted once per
        input signature."""
        return _weights.forward(
            self._model,
            self._weights,
            param_values,
            state_values,
            seed,
            inputs,
            training,
        )

    # Quantization (Keras' protocol; see `_quantize`).

    def quantize(
        self,
        mode: str | None = None,
        type_check: bool = True,
        config: Any = None,
    ) -> None:
        """Quantizes the wrapped module's weights with Qwix (`"int8"`,
        `"int4"`, `"float8"`), as `model.quantize(mode)` asks.

        Keras resolves `mode` and `config` and refuses an unbuilt or
        already quantized layer first. The quantized weights (integers and
        their scales, named by Flax path) replace the float ones; those of
        the operations Qwix leaves float (convolutions, LoRA adapters)
        stay, and still train.

        Raises:
            NotImplementedError: the model has nothing Qwix quantizes, the
                mode has no Qwix form, or the backend is not JAX (Keras'
                `model.quantize` warns and goes on).
            ValueError: Qwix refuses the module in this mode.
            ImportError: Qwix is not installed.
        """
        del type_check  # subclasses quantize their module as this does
        # Keras 3.14 and 3.15 resolve and check these before calling this
        # method; Keras 3.16's `model.quantize` does, its `layer.quantize`
        # is this method alone.
        mode = _checks.quantizable(
            self.name,
            mode or getattr(config, "mode", None),
            self.built,
            getattr(self, "_is_quantized", False),
            self.dtype_policy.name,
        )
        self._quantize_weights(mode, config)

    def _quantize_weights(self, mode: str, config: Any) -> None:
        """Replaces the float weights with Qwix's quantization of them;
        on any refusal, nothing is changed."""
        assert self._built_spec is not None  # built (Keras checked)
        quantized = _quantize.quantized(
            self._model,
            self.name,
            mode,
            config,
            self._weights.current_values(copy=False),
            _inputs.placeholders(self._built_spec, 1),
        )
        # The wrapped module (`FlaxLayer.module`) is Qwix's quantized copy
        # from now on: it holds the values.
        with _private.tracker_unlocked(self):
            self._adopt(quantized.model, quantized.frozen)
        self._is_quantized = True
        self.quantization_config = config
        if self.dtype_policy.quantization_mode is None:
            self.dtype_policy = _quantize.policy_name(
                mode, config, self.dtype_policy.name
            )
        self._runner = self._make_runner()  # ONNX refuses it from now on

    def quantized_call(self, *args: Any, **kwargs: Any) -> Any:
        # The quantized module is called as the float one was.
        return self.call(*args, **kwargs)

    # Serialization.

    def set_weights(self, weights: list[Any]) -> None:
        # Keras' `set_weights`, given copies of JAX arrays: every compiled
        # step donates the variables' buffers, and the given arrays stay
        # the user's.
        super().set_weights(
            [
                jax.numpy.array(w, copy=True) if isinstance(w, jax.Array) else w
                for w in weights
            ]
        )

    def save_own_variables(self, store: Any) -> None:
        # Leaf by leaf, parameters then state, whichever train and however
        # they are packed: the files are the same.
        for i, value in enumerate(self._weights.leaf_values()):
            store[str(i)] = value
        if self.seed_generator is not None:
            # Keras does not save seed generators; resumed training must
            # draw the same randomness as uninterrupted training.
            store[_SEED_STATE] = self.seed_generator.state.value

    def load_own_variables(self, store: Any) -> None:
        if _SEED_STATE in store.keys():
            if self.seed_generator is not None:
                self.seed_generator.state.assign(store[_SEED_STATE])
            store = {k: store[k] for k in store.keys() if k != _SEED_STATE}
        self._weights.load(self.name, store)

    def get_config(self) -> dict[Any, Any]:
        quantized = getattr(self, "_is_quantized", False)
        config = {
            # No policy given: none saved, so that the loaded layer keeps
            # the module's own dtypes too (a quantized one's policy is
            # saved: it quantizes the loaded layer).
            **({} if self._policy_given or quantized else {"dtype": None}),
            "seed": self.seed,
            "pack_weights": self.pack_weights,
            "native_serialization_platforms": (
                self.jax2tf_native_serialization_platforms
            ),
        }
        if self._wrt is not None:
            config["wrt"] = _wrt.to_config(self._wrt)
        if quantized:
            config["quantization_config"] = keras.saving.serialize_keras_object(
                self.quantization_config
            )
        return {**super().get_config(), **config, **self._model.config()}


_SEED_STATE = "seed_generator_state"


class _Untracked:
    """A value held by a layer as it is (Keras would wrap a tuple or dict
    set as a layer attribute into its own tracked types)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _nothing_left_out(params: PyTree) -> frozenset[Any]:
    return frozenset()
