"""JaxLayer: the Keras lifecycle around a model given as `(init_fn, call_fn)`.

Data flows one way: `init_fn` -> PyTrees of arrays -> Keras variables
(`_variables.VariableTree`) -> their values -> `call_fn` -> outputs and new
state -> assigned back. `FlaxLayer` only adapts a module to this protocol.
"""

import jax
import keras
import numpy as np

from keras_flax import _backends
from keras_flax import _errors
from keras_flax import _inputs
from keras_flax import _rng
from keras_flax import _serialization
from keras_flax import _signatures
from keras_flax import _variables


def check_backend(cls_name):
    """Refuses to construct a layer on a backend it cannot run on."""
    backend = keras.backend.backend()
    if backend not in _backends.SUPPORTED:
        raise ValueError(_errors.unsupported_backend(cls_name, backend))


@keras.saving.register_keras_serializable(package="keras_flax")
class JaxLayer(keras.layers.Layer):
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
            work per variable for modules with many leaves. `params` and
            `state` then hold views with the leaves' paths, shapes,
            `value` and `assign`; weights files are the same as without
            packing. Optimizers that treat each variable as a whole
            (`clipnorm`, weight-decay exclusions by name, Adafactor,
            LAMB) see one variable per pack; refused under `ModelParallel`.
        **kwargs: Keras layer arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: a JAX array or a PyTree of arrays.
        training: whether the call is in training mode.

    Returns:
        The outputs of `call_fn`.

    Example:

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
        call_fn,
        init_fn=None,
        params=None,
        state=None,
        seed=None,
        native_serialization_platforms=None,
        pack_weights=False,
        **kwargs,
    ):
        check_backend(type(self).__name__)
        if not isinstance(pack_weights, bool):
            raise TypeError(_errors.not_a_bool("pack_weights", pack_weights))
        call_arguments = _signatures.function_arguments(
            call_fn, "call_fn", _signatures.CALL_FN_ARGUMENTS
        )
        init_arguments = None
        if init_fn is not None:
            init_arguments = _signatures.function_arguments(
                init_fn, "init_fn", _signatures.INIT_FN_ARGUMENTS
            )
        has_weights = {"params", "state"} & set(call_arguments)
        if init_fn is None and params is None and state is None and has_weights:
            raise ValueError(_errors.nothing_to_initialize())
        super().__init__(**kwargs)
        self.call_fn = call_fn
        self.init_fn = init_fn
        self.call_fn_arguments = tuple(call_arguments)
        self.init_fn_arguments = init_arguments and tuple(init_arguments)
        self.call_fn_has_params = "params" in call_arguments
        self.call_fn_has_state = "state" in call_arguments
        self.seed = seed
        self.pack_weights = pack_weights
        self.jax2tf_native_serialization_platforms = (
            native_serialization_platforms
        )
        self.seed_generator = None
        if self._uses_rng():
            self.seed_generator = keras.random.SeedGenerator(seed)
        self._params_tree = None
        self._state_tree = None
        self._input_record = None
        self._built_spec = None
        self._runner = _backends.make_runner(
            self._forward, native_serialization_platforms
        )
        self._pending_weights = None
        # Given leaves that `init_fn` does not create, by the tree holding
        # them: path -> (shape, dtype). Unused parameters are frozen.
        self._unused_leaves = no_unused_leaves()
        if params is not None or state is not None:
            if pack_weights and init_fn is not None:
                # Packed at build, once it is known which leaves the model
                # uses (those it does not are packed apart, frozen).
                self._pending_weights = _Untracked((params, state))
            else:
                self._create_weights(params, state)

    # The argument that creates the weights, as messages name it.
    _initializer_argument = "init_fn"

    # Public attributes of keras.layers.JaxLayer.

    @property
    def params(self):
        """The trainable weights: a PyTree of Keras variables, or None."""
        return None if self._params_tree is None else self._params_tree.tree

    @property
    def state(self):
        """The non-trainable state: a PyTree of Keras variables, or None."""
        return None if self._state_tree is None else self._state_tree.tree

    # Hooks for subclasses.

    def _uses_rng(self):
        return "rng" in self.call_fn_arguments

    def _variable_name(self, trainable, parts):
        """Name parts of a variable from its path in `params` / `state`."""
        return parts if trainable else ("state", *parts)

    def _variable_metadata(self, parts):
        """What is known of the variable at path `parts`: its Flax
        partitioning `axes` and the `mirror` its values are copied into
        (see `_private.FlaxVariable`), or None."""
        return None

    def _init_rng(self):
        return _rng.key_from_seed(self.seed)

    def _wants_seed(self, training):
        """Whether a call in this mode is given a seed."""
        return self.seed_generator is not None and training

    def _call_seed(self, training):
        """The seed for this call (None for no RNG), drawn outside `jit`."""
        if not self._wants_seed(training):
            return None
        return self.seed_generator.next()

    def _rng_from_seed(self, seed):
        """The `rng` argument of `call_fn`, made inside the jitted call."""
        return seed

    def _user_trees(self, params, state):
        """The weights as the user gave them: `(argument name, tree)`."""
        return [("params", params), ("state", state)]

    # Weights.

    def _create_weights(self, params, state, frozen=()):
        self._params_tree = self._variable_tree(params, True, frozen)
        self._state_tree = self._variable_tree(state, False)

    def _variable_tree(self, values, trainable, frozen=()):
        if values is None:
            return None
        if self.pack_weights:
            _check_packing_allowed()
        return _variables.VariableTree(
            self,
            values,
            trainable=trainable,
            name_fn=lambda parts: self._variable_name(trainable, parts),
            autocast=trainable,
            metadata_fn=self._variable_metadata,
            packed=self.pack_weights,
            frozen=frozen,
        )

    def _given_trees(self):
        """The weights given at construction: `(params, state)`, as
        arrays until they are packed, else as Keras variables."""
        if self._pending_weights is not None:
            return self._pending_weights.value
        return tuple(
            None if tree is None else tree.tree
            for tree in (self._params_tree, self._state_tree)
        )

    def _split_init_result(self, result):
        if self.call_fn_has_state:
            return result
        return result, None

    def _run_init_fn(self, inputs):
        args = {"rng": self._init_rng(), "inputs": inputs, "training": True}
        result = self.init_fn(*(args[a] for a in self.init_fn_arguments))
        return self._split_init_result(result)

    # Keras lifecycle.

    def __call__(self, *args, **kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        if not self.built:
            self._input_record = _inputs.record(inputs, self.compute_dtype)
        elif self._built_spec is not None:
            _inputs.check(inputs, self._built_spec, self.name)
        return super().__call__(*args, **kwargs)

    def build(self, input_shape):
        spec = self._input_record
        if spec is None:
            spec = _inputs.from_shape(input_shape, self.compute_dtype)
        if all(tree is None for tree in self._given_trees()):
            if self.init_fn is not None:
                (params, state), spec = _inputs.search(
                    self._run_init_fn, spec, self._initializer_argument
                )
                # A layer saved with unused leaves gets them back, for the
                # weights file to fill.
                unused = self._unused_leaves
                params = _variables.with_leaves(params, unused["params"])
                state = _variables.with_leaves(state, unused["state"])
                self._pending_weights = _Untracked((params, state))
        else:
            self._unused_leaves = self._check_given_weights(spec)
        frozen = set(self._unused_leaves["params"])
        if self._pending_weights is not None:
            params, state = self._pending_weights.value
            self._pending_weights = None
            self._create_weights(
                params, state, frozen if self.pack_weights else ()
            )
        if self._params_tree is not None and not self._params_tree.packed:
            self._params_tree.freeze(frozen)
        self._built_spec = spec
        self._input_record = None

    def get_build_config(self):
        config = super().get_build_config()
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
        """Compares the given weights with what `init_fn` creates.

        Missing or mis-shaped leaves are refused. Returns the given leaves
        that `init_fn` does not create (a pretrained model's head, used
        through another method), by tree (`"params"`, `"state"`): they are
        kept, the parameters frozen, as Flax's `apply` accepts them. With
        unknown sizes only the paths are compared, at the first sizes the
        model accepts.
        """
        if self.init_fn is None:
            return no_unused_leaves()  # nothing to compare with
        sizes_known = not _inputs.has_unknown(spec, skip_batch=True)

        def expected_shapes(inputs):
            return jax.eval_shape(lambda: self._run_init_fn(inputs))

        try:
            if sizes_known:
                expected = expected_shapes(_inputs.placeholders(spec, 1))
            else:
                expected, _ = _inputs.search(expected_shapes, spec, "inputs")
        except Exception:
            return no_unused_leaves()  # the call raises the model's error
        return self._unused_or_raise(spec, expected, sizes_known)

    def _unused_or_raise(self, spec, expected, check_shapes):
        params, state = self._given_trees()
        held = {
            "params": _variables.specs_by_path(params),
            "state": _variables.specs_by_path(state),
        }
        unused = no_unused_leaves()
        given = self._user_trees(params, state)
        for (arg, tree), (_, want) in zip(
            given, self._user_trees(*expected), strict=True
        ):
            if tree is None or want is None:
                continue
            missing, extra, mismatched = _variables.compare(tree, want)
            if check_shapes and (missing or mismatched):
                raise ValueError(
                    _errors.variables_misfit(
                        arg,
                        f"of {spec}",
                        missing,
                        mismatched,
                        self._misfit_fix(arg),
                    )
                )
            for path in extra:  # `arg` is "params", "state" or both's
                which = "state" if arg == "state" else "params"
                if path not in held[which]:
                    which = "state"
                if held[which][path] is not None:  # not a static leaf
                    unused[which][path] = held[which][path]
        return unused

    def _misfit_fix(self, arg):
        return (
            "Call the layer on inputs of the shape the weights were made "
            f"for, or pass {arg}=None with `init_fn` to initialise new ones."
        )

    def call(self, inputs, training=False):
        if _backends.is_meta(inputs):
            # Keras' shape inference on PyTorch ("meta" tensors): shapes
            # alone, nothing run, no state written.
            spec = self._output_spec(inputs, training)
            return _backends.meta_tensors(spec)
        seed = self._call_seed(bool(training))
        outputs, new_state = self._runner(
            _values(self._params_tree),
            _values(self._state_tree),
            seed,
            inputs,
            # Static: one trace per mode only if `call_fn` sees the mode.
            training=bool(training) and "training" in self.call_fn_arguments,
            spec=self._built_spec,
        )
        if new_state is not None:
            self._state_tree.assign(new_state)
        return outputs

    def compute_output_spec(self, inputs, training=False):
        """The outputs' shapes, by `jax.eval_shape` on other backends.

        (Keras' own way on TensorFlow and PyTorch runs the layer on real
        or placeholder tensors of two made-up batch sizes.)
        """
        if _backends.name() != "jax":
            try:
                return self._output_spec(inputs, training)
            except Exception:  # shapes alone do not do: run it as Keras would
                return super().compute_output_spec(inputs, training=training)
        try:
            return super().compute_output_spec(inputs, training=training)
        except Exception as error:  # the module's, on symbolic sizes
            if not _inputs.unknown_dimensions(inputs):
                raise  # no size to try: the error is what it is
            return self._output_spec_by_sizes(inputs, training, error)

    def _output_spec(self, inputs, training, size=None):
        training = bool(training)
        seed = None
        if self._wants_seed(training):
            seed = jax.ShapeDtypeStruct((2,), "uint32")
        return _backends.output_spec(
            self._forward,
            _specs(self._params_tree, self.compute_dtype),
            _specs(self._state_tree, self.compute_dtype),
            seed,
            inputs,
            training and "training" in self.call_fn_arguments,
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
            except Exception:  # the module refuses this size: the next
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
        state_leaves = _leaves(self._state_tree, state_values)
        args = {
            "params": _rebuild(self._params_tree, param_values),
            "state": None
            if state_leaves is None
            else self._state_tree.unflatten_leaves(state_leaves),
            "rng": self._rng_from_seed(_backends.key_data(seed)),
            "inputs": inputs,
            "training": training,
        }
        result = self.call_fn(*(args[a] for a in self.call_fn_arguments))
        if not self.call_fn_has_state:
            return result, None
        outputs, new_state = _unpack_stateful(result)
        if self._state_tree is None:
            # No state held (`state=None`, or `init_fn` returned none):
            # the outputs, as `keras.layers.JaxLayer` returns them.
            _variables.check_no_state("call_fn", new_state)
            return outputs, None
        _variables.check_state_structure("call_fn", new_state, self._state_tree)
        new_leaves = self._state_tree.leaves_of(new_state)
        return outputs, self._state_tree.updates(new_leaves, state_leaves)

    # Serialization.

    def save_own_variables(self, store):
        if self.pack_weights and self.built:
            # Leaf by leaf, as without packing: the files are the same.
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
        if self.pack_weights and self.built:
            self._load_leaves(store)
        else:
            super().load_own_variables(store)

    def _leaf_values(self):
        """Every leaf's value, trainable then non-trainable, leaf order."""
        values = []
        for tree in (self._params_tree, self._state_tree):
            if tree is not None:
                arrays = [keras.ops.convert_to_numpy(v) for v in tree.values()]
                leaves = tree.leaves(arrays)
                values.extend(leaves)
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
            "seed": self.seed,
            "pack_weights": self.pack_weights,
            "native_serialization_platforms": (
                self.jax2tf_native_serialization_platforms
            ),
        }
        return {**super().get_config(), **config, **self._model_config()}

    def _model_config(self):
        """The config entries that describe the wrapped model."""
        return {
            "call_fn": _serialization.serialize_function(
                self.call_fn, "call_fn"
            ),
            "init_fn": _serialization.serialize_function(
                self.init_fn, "init_fn"
            ),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for arg in ("call_fn", "init_fn"):
            config[arg] = _serialization.deserialize_function(config[arg], arg)
        return cls(**config)


_SEED_STATE = "seed_generator_state"


def no_unused_leaves():
    """Unused given leaves by tree holding them: none."""
    return {"params": {}, "state": {}}


class _Untracked:
    """A value held by a layer as it is (Keras would wrap a tuple or dict
    set as a layer attribute into its own tracked types)."""

    def __init__(self, value):
        self.value = value


def _common_shape(*tensors):
    """The Keras tensor with the dimensions all `tensors` agree on."""
    first = tensors[0]
    shape = tuple(
        dims[0] if len(set(dims)) == 1 else None
        for dims in zip(*(t.shape for t in tensors), strict=True)
    )
    return keras.KerasTensor(shape, dtype=first.dtype)


def _values(tree):
    return None if tree is None else tree.values()


def _specs(tree, compute_dtype):
    """`ShapeDtypeStruct`s of the values a call reads from `tree`."""
    if tree is None:
        return None

    def spec(variable):
        dtype = keras.backend.standardize_dtype(variable.dtype)
        floating = jax.numpy.issubdtype(dtype, jax.numpy.floating)
        if tree.autocast and floating:
            dtype = compute_dtype
        return jax.ShapeDtypeStruct(tuple(variable.shape), dtype)

    return [spec(v) for v in tree.variables]  # the variables, packed or not


def _leaves(tree, values):
    return None if tree is None else tree.leaves(values)


def _check_packing_allowed():
    distribution = keras.distribution.distribution()
    if isinstance(distribution, keras.distribution.ModelParallel):
        raise ValueError(_errors.packing_under_model_parallel())


def _rebuild(tree, values):
    return None if tree is None else tree.rebuild(values)


def _unpack_stateful(result):
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ValueError(_errors.stateful_result(result))
    return result
