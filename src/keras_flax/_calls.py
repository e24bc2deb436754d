"""How a layer calls its model: each call's seed, the backend's runner of
the pure forward pass, and the output specs Keras asks for.

`Calls` holds what lasts from call to call: the runner (made once per
model; it compiles once per input signature), the layer's seed generator,
and whether the model has asked for randomness outside training. What a
call reads, the `Model` and the layer's `_weights.Weights`, is passed in as
the layer holds it then.

A model asking for randomness outside training (Flax's error for a missing
`dropout` RNG in inference) is an explicit decision here: the first time,
it is fed a seed from then on and called again; any other refusal is the
model's error, raised to the user.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax

from keras_flax import _backends
from keras_flax import _onnx
from keras_flax import _output_specs
from keras_flax import _user_code
from keras_flax._model import Model
from keras_flax._model import PyTree
from keras_flax._weights import Weights


class Calls:
    """A layer's calls of its model.

    Args:
        forward: the pure forward pass, `(param_values, state_values, seed,
            inputs, training) -> (outputs, new state values or None)`.
        seed_generator: the layer's `keras.random.SeedGenerator`; None for a
            model without RNG.
        platforms: the platforms `jax2tf` compiles for on TensorFlow.
        layer_name: the layer's name, for messages.
        quantized: the layer's quantization mode (None: not quantized).
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        seed_generator: Any,
        platforms: list[str] | None,
        layer_name: str,
        quantized: str | None,
    ) -> None:
        self.forward = forward
        self.seed_generator = seed_generator
        self.platforms = platforms
        self.layer_name = layer_name
        # Whether the model asked for randomness outside training.
        self.inference_rng = False
        self.runner = self.make_runner(quantized)

    def make_runner(self, quantized: str | None) -> Any:
        """The backend's runner of `forward` (see `_backends`); on JAX,
        guarded for ONNX conversion (which refuses a quantized layer)."""
        runner = _backends.make_runner(
            self.forward, self.platforms, self.layer_name
        )
        if _backends.name() == "jax":
            runner = _onnx.guarded(
                self.layer_name, runner, self.forward, quantized=quantized
            )
        return runner

    def run(
        self,
        model: Model,
        weights: Weights,
        inputs: PyTree,
        training: bool,
        remat: bool,
        policy: Any,
    ) -> Any:
        """The outputs of a call in mode `training`, the new state assigned
        to `weights`; `remat`: checkpointed (`keras.RematScope`); `policy`:
        the layer's `keras.DTypePolicy`."""
        cast_to = _cast_to(policy)
        call = functools.partial(self._call, model, weights)
        outcome = _user_code.attempt(call, inputs, training, remat, cast_to)
        if self._feeds_rng_from_now(model, outcome, training):
            outcome = _user_code.attempt(call, inputs, training, remat, cast_to)
        return _user_code.result(outcome)

    def output_spec(
        self,
        model: Model,
        weights: Weights,
        inputs: PyTree,
        training: bool,
        policy: Any,
        keras_way: Callable[[], Any],
    ) -> Any:
        """The outputs' shapes, by `jax.eval_shape` of the forward pass,
        unknown sizes symbolic.

        Where the model refuses symbolic sizes: on JAX, the shapes at sizes
        it accepts (`_output_specs`); on TensorFlow and PyTorch,
        `keras_way()` (Keras runs the layer on placeholder tensors).
        """
        training = bool(training)
        cast_to = _cast_to(policy)
        probe = functools.partial(
            self._output_spec, model, weights, training=training
        )
        specs = _user_code.attempt(probe, inputs, cast_to)
        if self._feeds_rng_from_now(model, specs, training):
            specs = _user_code.attempt(probe, inputs, cast_to)
        if not isinstance(specs, _user_code.Refused):
            return specs
        if _backends.name() != "jax":
            return keras_way()
        built = weights.spec
        return _output_specs.at_accepted_sizes(
            lambda x, size: probe(x, cast_to, size=size),
            inputs,
            None if built is None else built.size,
            self.layer_name,
            specs,
        )

    def _call(
        self,
        model: Model,
        weights: Weights,
        inputs: PyTree,
        training: bool,
        remat: bool,
        cast_to: str | None,
    ) -> Any:
        if _backends.is_meta(inputs):
            # Keras' shape inference on PyTorch ("meta" tensors): shapes
            # alone, nothing run, no state written.
            spec = self._output_spec(model, weights, inputs, cast_to, training)
            return _backends.meta_tensors(spec)
        # Drawn outside `jit`, as a Keras state update must be.
        seed = None
        if self._wants_seed(training):
            seed = self.seed_generator.next()
        outputs, new_state = self.runner(
            weights.params.values(),
            weights.state.values(),
            seed,
            inputs,
            training=training and model.takes_training,
            spec=weights.spec,
            remat=remat,
        )
        if new_state is not None:
            weights.state.assign(new_state)
        return outputs

    def _output_spec(
        self,
        model: Model,
        weights: Weights,
        inputs: PyTree,
        cast_to: str | None,
        training: bool,
        size: int | None = None,
    ) -> Any:
        seed = None
        if self._wants_seed(training):
            seed = jax.ShapeDtypeStruct((2,), "uint32")
        return _backends.output_spec(
            self.forward,
            *weights.specs(cast_to),
            seed,
            inputs,
            # One trace per mode only where the model sees the mode.
            training and model.takes_training,
            size=size,
        )

    def save(self, store: Any) -> None:
        """Saves the seed generator's state into a layer's weights `store`
        (Keras saves none: resumed training must draw the randomness
        uninterrupted training would)."""
        if self.seed_generator is not None:
            store[_SEED_STATE] = self.seed_generator.state.value

    def load(self, store: Any) -> Any:
        """Loads the seed generator's state from `store` (where saved);
        returns the rest of `store`."""
        if _SEED_STATE not in store.keys():
            return store
        if self.seed_generator is not None:
            self.seed_generator.state.assign(store[_SEED_STATE])
        return {k: store[k] for k in store.keys() if k != _SEED_STATE}

    def _wants_seed(self, training: bool) -> bool:
        """Whether a call in this mode is given a seed."""
        return self.seed_generator is not None and (
            training or self.inference_rng
        )

    def _feeds_rng_from_now(
        self, model: Model, outcome: Any, training: bool
    ) -> bool:
        """Whether `outcome` is the model asking for randomness outside
        training for the first time: then it is fed some from now on, and
        the call is to be made again."""
        asks = isinstance(outcome, _user_code.Refused) and isinstance(
            outcome.error, model.rng.inference_error
        )
        if training or self.inference_rng or not asks:
            return False
        self.inference_rng = True
        return True


_SEED_STATE = "seed_generator_state"


def _cast_to(policy: Any) -> str | None:
    """The dtype Keras casts float variables to in a call, where the compute
    dtype differs from the storage dtype (a mixed policy); else None."""
    if policy.compute_dtype == policy.variable_dtype:
        return None
    return policy.compute_dtype
