"""What a layer holds: its `Model` and the model's `_weights.Weights`, and
the three ways they change.

- Made: trees given with the model become Keras variables at
  construction, as the built-in layers make them (packed ones wait for
  build: packing needs to know which leaves train).
- Built: the inputs complete a model that they complete (`Live.build`),
  and the plan for them (`_weights.plan`) makes the weights, or checks
  and freezes those held.
- Adopted: a new model (completed at build, or quantized) replaces the
  one held, and its weights the old ones.

The model held has no trees (`params`, `state`): the variables hold them,
and nothing else keeps them.
"""

import dataclasses
from typing import Any

from keras_flax import _backends
from keras_flax import _inputs
from keras_flax import _private
from keras_flax import _quantize
from keras_flax import _weights
from keras_flax import _wrt
from keras_flax._model import Model
from keras_flax._model import PyTree


class Holding:
    """A layer's model and weights.

    Args:
        layer: the Keras layer the variables are made in.
        model: the `Model`, with the trees it is given (if any).
        packed: hold the leaves of each dtype in one flat variable.
        wrt: the filter of the parameters that train, as given (None: all).
        trains: the predicate of `wrt` (`_wrt.predicate`), or None.
        policy_given: whether the layer's dtype policy decides the storage
            dtype of floats (else the module's own dtypes are kept).
    """

    def __init__(
        self,
        layer: Any,
        model: Model,
        *,
        packed: bool,
        wrt: Any,
        trains: Any,
        policy_given: bool,
    ) -> None:
        self.layer = layer
        self.packed = packed
        self.wrt = wrt
        self.trains = trains
        self.policy_given = policy_given
        self.model = model
        given = None
        if model.params is not None or model.state is not None:
            given = (model.params, model.state)
        self.weights = _weights.Weights.empty(layer, model.axes, given)
        if given is not None and not (packed and model.init is not None):
            plan = _weights.given(model, *given, self.left_out)
            self.weights = self._create(model, plan)
        self.model = model.replace(params=None, state=None)
        self._submodules = None

    def view(self, tree: PyTree) -> Any:
        """A tree of the layer's as the model shows it."""
        user_format = self.model.user_format
        return tree if user_format is None else user_format.view(tree)

    def submodules(self) -> Any:
        """The built model's submodules (`Structure.nodes`), traced once
        for the model held (saving reads a layer's `layers` too)."""
        structure, spec = self.model.structure, self.weights.spec
        assert structure is not None and spec is not None
        if self._submodules is None:
            shapes = self.weights.shapes()
            structs = _backends.symbolic_structs(spec.tree)
            self._submodules = structure.nodes(*shapes, structs)
        return self._submodules

    def config(self, quantized: bool) -> dict[str, Any]:
        """The layer config's entries for what is held this way."""
        config = {}
        if not (self.policy_given or quantized):
            # No policy given: none saved, so that the loaded layer keeps
            # the module's own dtypes too (a quantized one's policy is
            # saved: it quantizes the loaded layer).
            config["dtype"] = None
        if self.wrt is not None:
            config["wrt"] = _wrt.to_config(self.wrt)
        return config

    def left_out(self, params: PyTree) -> frozenset[Any]:
        """The keys of the parameters `wrt` leaves out (none without)."""
        if self.trains is None:
            return frozenset()
        label, tuning = self.model.diagnostics.label, self.model.fine_tuning
        assert tuning is not None  # else `_wrt.predicate` refused
        candidates = tuning.candidates(params)
        return _wrt.left_out(self.wrt, self.trains, label, candidates)

    def build(self, spec: _inputs.Specs, seed: int | None) -> None:
        """Completes the model for inputs of `spec`, then makes its weights
        (`init`'s, or the given ones checked), or checks those held."""
        self._complete(spec)
        weights = self.weights
        plan = _weights.plan(
            self.model,
            spec,
            weights.to_plan(),
            seed=seed,
            layer_name=self.layer.name,
            axes=weights.axes,
            # Those held were frozen when made (and a user's `wrt`
            # function is given arrays, not shapes).
            left_out=self.left_out if weights.holds_nothing else _none,
            saved_unused=weights.unused,
        )
        if weights.holds_nothing:
            self.weights = self._create(self.model, plan)
        else:
            weights.built(plan)
        # The user's module re-pointed at the values as laid out (under a
        # distribution, its shards: no whole copy stays on a device).
        self.weights.write_back()

    def adopt(self, model: Model, frozen: frozenset[str] = frozenset()) -> None:
        """Holds `model`, with the weights it is given (those at `frozen`
        paths, and those `wrt` leaves out, frozen), in place of the model
        and weights held so far; the input specs and unused leaves stay."""
        plan = _weights.given(model, model.params, model.state, self.left_out)
        old = self.weights
        plan = dataclasses.replace(
            plan, frozen=plan.frozen | frozen, spec=old.spec, unused=old.unused
        )
        self.weights = self._create(model, plan)
        self.model = model.replace(params=None, state=None)
        self._submodules = None
        for variable in old.variables:
            _private.untrack_variable(self.layer, variable)

    def quantize(self, mode: str, config: Any) -> None:
        """Replaces the model and its float weights with Qwix's quantized
        ones (`_quantize.quantized`, which changes nothing where it
        refuses); the wrapped module is Qwix's quantized copy from now on.
        """
        spec = self.weights.spec
        assert spec is not None  # built (Keras checked)
        quantized = _quantize.quantized(
            self.model,
            self.layer.name,
            mode,
            config,
            self.weights.current_values(copy=False),
            _inputs.placeholders(spec, 1),
        )
        with _private.tracker_unlocked(self.layer):
            self.adopt(quantized.model, quantized.frozen)

    def _complete(self, spec: _inputs.Specs) -> None:
        """Completes a model that the inputs complete (a module creating
        its variables on its first call, or sized from its input)."""
        live = self.model.live
        while live is not None and live.build is not None:
            model = live.build(spec, self.layer.name)
            if model is None:
                return
            # Rebuilt by the config of the model the layer was made with.
            self.adopt(model.replace(config=self.model.config))
            live = self.model.live

    def _create(self, model: Model, plan: _weights.Plan) -> _weights.Weights:
        """The variables of `plan`, in the layer."""
        return _weights.Weights.create(
            self.layer,
            model,
            plan,
            packed=self.packed,
            float_dtype=self._float_dtype,
        )

    def _float_dtype(self, dtype: Any) -> Any:
        """The storage dtype of a float leaf of `dtype`."""
        return self.layer.variable_dtype if self.policy_given else dtype


def _none(params: PyTree) -> frozenset[Any]:
    """No parameters left out."""
    return frozenset()
