"""ModelLayer: the Keras lifecycle around a `Model` (see `_model`).

Data flows one way: `model.init` -> `model.split` -> PyTrees of arrays ->
Keras variables (`_variables.VariableTree`) -> their values ->
`model.apply` -> outputs and new state -> assigned back. The layer never
asks what kind of model it holds; `JaxLayer` and `FlaxLayer` only make the
`Model` and name the public attributes.
"""

import functools
from typing import Any

import jax
import keras
import numpy as np

from keras_flax import _backends
from keras_flax import _checks
from keras_flax import _errors
from keras_flax import _inputs
from keras_flax import _layouts
from keras_flax import _onnx
from keras_flax import _packing
from keras_flax import _variables
from keras_flax import _wrt
from keras_flax._model import Model


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
        **kwargs: Keras layer arguments.
    """

    def __init__(
        self,
        model: Model,
        seed: int | None = None,
        native_serialization_platforms: list[str] | None = None,
        pack_weights: bool = False,
        wrt: Any = None,
        **kwargs,
    ):
        self._trains = _wrt.predicate(
            wrt, model.fine_tuning, model.diagnostics.label
        )
        # A dtype policy given to the layer, or a global one other than the
        # default, decides the float storage; else the module's own dtypes
        # are kept (a `param_dtype=bfloat16` module holds bfloat16).
        self._policy_given = (
            kwargs.get("dtype") is not None
            or keras.config.dtype_policy().name != "float32"
        )
        super().__init__(**kwargs)
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
        self._params_tree = None
        self._state_tree = None
        self._input_record = None
        self._built_spec = None
        self._axes = dict(model.axes)
        self._runner = _backends.make_runner(
            self._forward, native_serialization_platforms
        )
        self._pending_weights = None
        # Given leaves that `init` does not create, by the tree holding
        # them: path -> (shape, dtype). Unused parameters are frozen.
        self._unused_leaves = no_unused_leaves()
        # Parameters the user's choice (`wrt`) does not train, by path.
        self._not_trained = frozenset()
        if model.params is not None or model.state is not None:
            if model.params is not None:
                self._not_trained = self._left_out(model.params)
            # Arrays the user passed are copied once; an NNX module's own
            # arrays are shared with it (one copy of each weight).
            copy = not model.shares_given
            if pack_weights and model.init is not None:
                # Packed at build, once it is known which leaves the model
                # uses (those it does not are packed apart, frozen).
                self._pending_weights = _Untracked(
                    (model.params, model.state), copy=copy
                )
            else:
                self._create_weights(
                    model.params, model.state, self._not_trained, copy
                )
            # The variables (or the pending trees) hold the given weights
            # now: nothing else keeps them.
            self._model = model.replace(params=None, state=None)

    @property
    def params(self) -> Any:
        """The trainable weights: a PyTree of Keras variables, or None."""
        return self._view(_tree(self._params_tree))

    @property
    def state(self) -> Any:
        """The non-trainable state: a PyTree of Keras variables, or None."""
        return self._view(_tree(self._state_tree))

    @property
    def tracked_params(self) -> list:
        """The trainable weights' Keras variables, flat (as the built-in
        `keras.layers.JaxLayer` lists them; packs where packed)."""
        return [] if self._params_tree is None else self._params_tree.variables

    @property
    def tracked_state(self) -> list:
        """The non-trainable state's Keras variables, flat."""
        return [] if self._state_tree is None else self._state_tree.variables

    def _view(self, tree):
        """A tree of the layer's as the model shows it."""
        user_format = self._model.user_format
        return tree if user_format is None else user_format.view(tree)

    def _left_out(self, params):
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

    def _current_values(self, copy=True):
        """`(params, state)`: the current values (copies), as trees."""
        return tuple(
            None
            if tree is None
            else tree.rebuild([_copy(v) if copy else v for v in tree.values()])
            for tree in (self._params_tree, self._state_tree)
        )

    def _weights_by_name(self):
        """What holds each weight, by its name inside the layer (the Flax
        path, `Dense_0/kernel`, `batch_stats/BatchNorm_0/mean`): a Keras
        variable, or a packed leaf's view; `(params, state)`, two dicts.
        RNG state is left out."""
        return tuple(
            {
                name: holder
                for name, holder in zip(tree.names, tree.holders(), strict=True)
                if name not in self._model.rng_state
            }
            if tree is not None
            else {}
            for tree in (self._params_tree, self._state_tree)
        )

    def _write_back(self):
        """Copies every current value into the user's object, where the
        model writes back (an NNX module); not inside traced computations.
        """
        if not all(_backends.is_concrete(v.value) for v in self.variables):
            return
        for tree in (self._params_tree, self._state_tree):
            if tree is not None:
                tree.mirror_values()

    # Weights.

    def _create_weights(self, params, state, frozen=(), copy=False):
        """Variables of `params` (trainable, but at the paths `frozen`) and
        of `state`, holding copies of the arrays where `copy` is set (else
        the arrays themselves). Frozen ones are made non-trainable, so that
        Keras holds them apart (`layer.trainable = True` leaves them
        frozen)."""
        self._params_tree = self._variable_tree(params, True, frozen, copy)
        self._state_tree = self._variable_tree(state, False, copy=copy)
        trees = [t for t in (self._params_tree, self._state_tree) if t]
        paths = [v.path for tree in trees for v in tree.variables]
        _layouts.warn_unmatched(self.name, paths)

    def _float_dtype(self, dtype):
        """The storage dtype of a float leaf of `dtype`."""
        return self.variable_dtype if self._policy_given else dtype

    def _assign_user_variables(self, variables):
        """Assigns every value of `variables` (the model's own format);
        all are checked first, and on a misfit nothing changes."""
        trees = [t for t in (self._params_tree, self._state_tree) if t]
        if not trees:
            raise ValueError(_errors.assigned_before_build(self.name))
        user_format = self._model.user_format
        assert user_format is not None  # only layers of such kinds assign
        given = _variables.by_path(user_format.from_user(variables))
        held = {}
        for tree in trees:
            held.update(_variables.by_path(self._view(tree.tree)))
        _checks.assignable(self.name, given, held)
        for path, variable in held.items():
            # A copy: `fit` donates the variables' buffers, and the given
            # arrays stay the user's.
            value = _copy(_variables.key_data(given[path]))
            variable.assign(_backends.initial_value(value))
        self._write_back()

    def _variable_tree(self, values, trainable, frozen=(), copy=False):
        if values is None:
            return None
        if self.pack_weights:
            _checks.packing_allowed()
        model = self._model
        user_format = model.user_format
        write_back = None if user_format is None else user_format.write_back

        def metadata(parts):
            return {
                "axes": self._axes.get(_variables.path_text(parts)),
                "mirror": None if write_back is None else write_back(parts),
            }

        tree_class = _variables.VariableTree
        if self.pack_weights:
            tree_class = _packing.PackedTree
        return tree_class(
            self,
            values,
            trainable=trainable,
            name_fn=lambda parts: model.names(trainable, parts),
            autocast=trainable,
            metadata_fn=metadata,
            frozen=frozen,
            float_dtype=self._float_dtype,
            copy=copy,
        )

    def _given_trees(self):
        """The weights given at construction: `(params, state)`, as
        arrays until they are packed, else as Keras variables."""
        if self._pending_weights is not None:
            return self._pending_weights.value
        return _tree(self._params_tree), _tree(self._state_tree)

    def _init(self, inputs):
        """`(params, state, axes)` at `inputs` (placeholders); under a
        distribution that shards weights, each created in its shards."""
        model = self._model
        init = model.init
        rng_of = model.rng.init
        assert init is not None and rng_of is not None  # built by `init`
        rng = rng_of(self.seed)
        if keras.distribution.distribution() is not None:
            *shapes, axes = model.split(jax.eval_shape(init, rng, inputs))
            shardings = _layouts.init_shardings(
                self.name, shapes, model.names, {**self._axes, **axes}
            )
            if shardings is not None:
                sharded = _layouts.sharded_init(
                    lambda rng, x: model.split(init(rng, x))[:2],
                    shardings,
                )
                return (*sharded(rng, inputs), axes)
        return model.split(init(rng, inputs))

    # Keras lifecycle.

    def __call__(self, *args, **kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        if not self.built:
            self._input_record = _inputs.record(inputs, self.compute_dtype)
        elif self._built_spec is not None:
            _checks.inputs_fit(inputs, self._built_spec, self.name)
        return super().__call__(*args, **kwargs)

    @_errors.raises_user_errors
    def build(self, input_shape):
        spec = self._input_record
        if spec is None:
            spec = _inputs.from_shape(input_shape, self.compute_dtype)
        if all(tree is None for tree in self._given_trees()):
            if self._model.init is not None:
                (params, state, axes), spec = _inputs.search(
                    self._init, spec, self._model.diagnostics.initializer
                )
                self._axes.update(axes)
                self._not_trained = self._left_out(params)
                # A layer saved with unused leaves gets them back, for the
                # weights file to fill.
                unused = self._unused_leaves
                params = _variables.with_leaves(params, unused["params"])
                state = _variables.with_leaves(state, unused["state"])
                self._pending_weights = _Untracked((params, state), copy=False)
        else:
            self._unused_leaves = self._check_given_weights(spec)
        frozen = set(self._unused_leaves["params"])
        if self._pending_weights is not None:
            pending, self._pending_weights = self._pending_weights, None
            params, state = pending.value
            self._create_weights(
                params,
                state,
                self._not_trained | (frozen if self.pack_weights else set()),
                pending.copy,
            )
        if self._params_tree is not None and not self._params_tree.packed:
            self._params_tree.freeze(frozen)
        self._built_spec = spec
        self._input_record = None

    def get_build_config(self):
        config: dict[str, Any] | None = super().get_build_config()
        if config is not None and self._built_spec is not None:
            config["input_dtypes"] = self._built_spec.dtype_names()
        if config is not None and any(self._unused_leaves.values()):
            config["unused_leaves"] = {
                which: {
                    path: [list(shape), jax.numpy.dtype(dtype).name]
                    for path, (shape, dtype) in leaves.items()
                }
                for which, leaves in self._unused_leaves.items()
            }
        return config

    def build_from_config(self, config):
        if config and "unused_leaves" in config:
            self._unused_leaves = {
                which: {
                    path: (tuple(shape), dtype)
                    for path, (shape, dtype) in leaves.items()
                }
                for which, leaves in config["unused_leaves"].items()
            }
        if config and "input_dtypes" in config and "input_shape" in config:
            self._input_record = _inputs.from_shape(
                config["input_shape"],
                self.compute_dtype,
                config["input_dtypes"],
            )
        super().build_from_config(config)

    def _check_given_weights(self, spec):
        """Compares the given weights with what `init` creates.

        Missing or mis-shaped leaves are refused; a model that would create
        variables when called (a lazily built NNX module) is refused.
        Returns the given leaves that `init` does not create (a pretrained
        model's head, used through another method), by tree: they are
        kept, the parameters frozen, as Flax's `apply` accepts them. With
        unknown sizes only the paths are compared, at the first sizes the
        model accepts.
        """
        model = self._model
        if model.diagnostics.created is not None:
            if self._pending_weights is not None:
                given = self._pending_weights.value
            else:
                # Shapes alone (traced only; on TensorFlow and PyTorch the
                # values are the backend's variables).
                given = jax.tree_util.tree_map(
                    _spec_of, self._current_values(copy=False)
                )
            params, state = given
            _checks.nothing_created(
                model, params, state, _inputs.placeholders(spec, 1)
            )
        if model.init is None:
            return no_unused_leaves()  # nothing to compare with
        sizes_known = not _inputs.has_unknown(spec, skip_batch=True)

        def expected_shapes(inputs):
            return jax.eval_shape(lambda: self._init(inputs)[:2])

        try:
            if sizes_known:
                expected = expected_shapes(_inputs.placeholders(spec, 1))
            else:
                expected, _ = _inputs.search(expected_shapes, spec, "inputs")
        except _errors.UserCodeError:
            return no_unused_leaves()  # the call raises the model's error
        return _checks.unused_leaves(
            model, self._given_trees(), expected, spec, sizes_known
        )

    def call(self, inputs, training=False):
        return self._run(inputs, training, remat=False)

    def rematerialized_call(self, layer_call, *args, **kwargs):
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

    @_errors.raises_user_errors
    def _run(self, inputs, training=False, *, remat):
        try:
            return self._call(inputs, training, remat)
        except _errors.UserCodeError as refused:
            if not self._feeds_rng_from_now(refused, training):
                raise
            return self._call(inputs, training, remat)

    def _feeds_rng_from_now(self, refused, training):
        """Whether `refused` (a `UserCodeError`) asks for randomness
        outside training for the first time; then the model is fed some
        from now on, and the call is to be made again."""
        asks = isinstance(refused.error, self._model.rng.inference_error)
        if training or self._inference_rng or not asks:
            return False
        self._inference_rng = True
        return True

    def _call(self, inputs, training, remat):
        if _backends.is_meta(inputs):
            # Keras' shape inference on PyTorch ("meta" tensors): shapes
            # alone, nothing run, no state written.
            spec = self._output_spec(inputs, training)
            return _backends.meta_tensors(spec)
        seed = self._call_seed(bool(training))
        args = (_values(self._params_tree), _values(self._state_tree), seed)
        training = self._static_training(training)
        run = self._runner
        if _onnx.converting(inputs):
            run = _onnx.converted(self.name, run, self._forward)
        outputs, new_state = run(
            *args, inputs, training=training, spec=self._built_spec, remat=remat
        )
        if new_state is not None and self._state_tree is not None:
            self._state_tree.assign(new_state)
        return outputs

    def _static_training(self, training):
        """The mode `model.apply` is traced in (one trace per mode only
        where the model sees the mode)."""
        return bool(training) and self._model.takes_training

    def _wants_seed(self, training):
        """Whether a call in this mode is given a seed."""
        return self.seed_generator is not None and (
            training or self._inference_rng
        )

    def _call_seed(self, training):
        """The seed for this call (None for no RNG), drawn outside `jit`."""
        if self.seed_generator is None or not self._wants_seed(training):
            return None
        return self.seed_generator.next()

    @_errors.raises_user_errors
    def compute_output_spec(self, inputs, training=False):
        """The outputs' shapes, by `jax.eval_shape` of the forward pass,
        unknown sizes symbolic.

        Where the model refuses symbolic sizes: on JAX, the shapes at sizes
        it accepts (`_output_spec_by_sizes`); on TensorFlow and PyTorch,
        Keras' own way (the layer run on placeholder tensors of two
        made-up batch sizes).
        """
        try:
            return self._output_spec(inputs, training)
        except _errors.UserCodeError as error:
            refused = error
        if self._feeds_rng_from_now(refused, training):
            return self.compute_output_spec(inputs, training)
        if _backends.name() != "jax":
            return super().compute_output_spec(inputs, training=training)
        if not _inputs.unknown_dimensions(inputs):
            raise refused  # no size to try: the error is the model's
        return self._output_spec_by_sizes(inputs, training, refused.error)

    def _output_spec(self, inputs, training, size=None):
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
            _specs(self._params_tree, cast_to),
            _specs(self._state_tree, cast_to),
            seed,
            inputs,
            self._static_training(training),
            size=size,
        )

    def _output_spec_by_sizes(self, inputs, training, symbolic_error):
        """Output specs for a module that cannot take unknown sizes
        symbolically (a ViT adding position embeddings for a fixed number
        of patches): shapes at the sizes the module accepts, the batch kept
        symbolic. An output dimension that differs between two accepted
        sizes is unknown; with one accepted size it is that size's.
        """
        spec = self._built_spec
        searched = () if spec is None or spec.size is None else (spec.size,)
        sizes = dict.fromkeys(searched + _inputs.CANDIDATE_SIZES)
        found = []
        for size in sizes:
            try:
                found.append(self._output_spec(inputs, training, size))
            except _errors.UserCodeError:  # the module refuses this size
                continue
            if len(found) == 2:
                break
        if not found:
            raise ValueError(
                _errors.output_shape_unknown(
                    self.name,
                    _inputs.unknown_dimensions(inputs),
                    tuple(sizes),
                    symbolic_error,
                )
            ) from symbolic_error
        return jax.tree_util.tree_map(_common_shape, *found)

    def _forward(self, param_values, state_values, seed, inputs, training):
        """The pure forward pass, jitted once per input signature.

        Returns the outputs and the new state values in leaf order, with
        `None` for leaves the call left unchanged (not written back).
        """
        tree = self._state_tree
        state_leaves = _leaves(tree, state_values)
        params = _rebuild(self._params_tree, param_values)
        state = given = None
        if tree is not None:
            state = tree.unflatten_leaves(state_leaves)
            given = tree.treedef.flatten_up_to(state)
        call_rng = self._model.rng.call
        rng = None if call_rng is None else call_rng(_backends.key_data(seed))
        outputs, new_state = self._model.apply(
            params, state, rng, inputs, training
        )
        if self._state_tree is None:
            # No state held (`state=None`, or `init_fn` returned none):
            # the outputs, as `keras.layers.JaxLayer` returns them.
            _checks.no_state("call_fn", new_state)
            return outputs, None
        _checks.state_structure("call_fn", new_state, self._state_tree)
        new_leaves = self._state_tree.leaves_of(new_state, given)
        return outputs, self._state_tree.updates(new_leaves, state_leaves)

    # Serialization.

    def _holds_weights(self):
        return self._params_tree is not None or self._state_tree is not None

    def save_own_variables(self, store):
        if self._holds_weights():
            # Leaf by leaf, parameters then state, whichever train and
            # however they are packed: the files are the same.
            for i, value in enumerate(self._leaf_values()):
                store[str(i)] = value
        else:
            super().save_own_variables(store)
        if self.seed_generator is not None:
            # Keras does not save seed generators; resumed training must
            # draw the same randomness as uninterrupted training.
            store[_SEED_STATE] = self.seed_generator.state.value

    def load_own_variables(self, store):
        if _SEED_STATE in store.keys():
            if self.seed_generator is not None:
                self.seed_generator.state.assign(store[_SEED_STATE])
            store = {k: store[k] for k in store.keys() if k != _SEED_STATE}
        if self._holds_weights():
            self._load_leaves(store)
        else:
            super().load_own_variables(store)

    def _leaf_values(self):
        """Every leaf's value, trainable then non-trainable, leaf order."""
        values = []
        for tree in (self._params_tree, self._state_tree):
            if tree is not None:
                arrays = [keras.ops.convert_to_numpy(v) for v in tree.values()]
                values.extend(tree.leaves(arrays))
        return values

    def _load_leaves(self, store):
        trees = [t for t in (self._params_tree, self._state_tree) if t]
        specs = [spec for tree in trees for spec in tree.leaf_specs()]
        if len(store.keys()) != len(specs):
            raise ValueError(
                _errors.weights_count_mismatch(
                    self.name, len(specs), len(store.keys())
                )
            )
        arrays = iter(np.asarray(store[str(i)]) for i in range(len(specs)))
        for tree in trees:
            leaves = [next(arrays) for _ in tree.leaf_specs()]
            values = tree.updates(leaves, [None] * len(leaves))
            tree.assign([np.asarray(v) for v in values])

    def get_config(self):
        config = {
            # No policy given: none saved, so that the loaded layer keeps
            # the module's own dtypes too.
            **({} if self._policy_given else {"dtype": None}),
            "seed": self.seed,
            "pack_weights": self.pack_weights,
            "native_serialization_platforms": (
                self.jax2tf_native_serialization_platforms
            ),
        }
        if self._wrt is not None:
            config["wrt"] = _wrt.to_config(self._wrt)
        return {**super().get_config(), **config, **self._model.config()}


_SEED_STATE = "seed_generator_state"


def no_unused_leaves() -> dict[str, dict[str, Any]]:
    """Unused given leaves by tree holding them: none."""
    return {"params": {}, "state": {}}


class _Untracked:
    """A value held by a layer as it is (Keras would wrap a tuple or dict
    set as a layer attribute into its own tracked types)."""

    def __init__(self, value: Any, copy: bool = False):
        self.value = value
        self.copy = copy  # whether the variables made of it copy it


def _common_shape(*tensors):
    """The Keras tensor with the dimensions all `tensors` agree on."""
    first = tensors[0]
    shape = tuple(
        dims[0] if len(set(dims)) == 1 else None
        for dims in zip(*(t.shape for t in tensors), strict=True)
    )
    return keras.KerasTensor(shape, dtype=first.dtype)


def _spec_of(value):
    """A JAX array as it is, another backend's tensor as its shape."""
    if isinstance(value, jax.Array):
        return value
    dtype = keras.backend.standardize_dtype(value.dtype)
    return jax.ShapeDtypeStruct(tuple(value.shape), dtype)


def _copy(value):
    return jax.numpy.array(_backends.to_jax(value), copy=True)


def _tree(tree):
    return None if tree is None else tree.tree


def _values(tree):
    return None if tree is None else tree.values()


def _specs(tree, cast_to):
    """`ShapeDtypeStruct`s of the values a call reads from `tree`, floats
    cast to `cast_to` where the tree autocasts (None: not cast)."""
    if tree is None:
        return None

    def spec(variable):
        dtype = keras.backend.standardize_dtype(variable.dtype)
        floating = jax.numpy.issubdtype(dtype, jax.numpy.floating)
        if tree.autocast and floating and cast_to is not None:
            dtype = cast_to
        return jax.ShapeDtypeStruct(tuple(variable.shape), dtype)

    return [spec(v) for v in tree.variables]  # the variables, packed or not


def _leaves(tree, values):
    return None if tree is None else tree.leaves(values)


def _rebuild(tree, values):
    return None if tree is None else tree.rebuild(values)
