"""A Flax NNX module as a `Model`, through `nnx.split` / `nnx.merge`.

An NNX module is built eagerly, so its variables exist before the layer
does: they are the given `params` (every `nnx.Param`) and `state` (every
other `nnx.Variable`: batch statistics, RNG keys and counts, caches, user
variable types, plain array attributes). `apply` merges them into a module
in train or eval mode, calls it, and splits the new state out; the layer's
values are written back into the user's module (`write_back`).
"""

import collections.abc
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from keras_flax import _backends
from keras_flax import _checks
from keras_flax import _errors
from keras_flax import _inputs
from keras_flax import _quantize
from keras_flax import _rng
from keras_flax import _serialization
from keras_flax import _sizes
from keras_flax import _summary
from keras_flax import _variables
from keras_flax._model import Diagnostics
from keras_flax._model import FineTuning
from keras_flax._model import Model
from keras_flax._model import PyTree
from keras_flax._model import Quantization
from keras_flax._model import Rng
from keras_flax._model import Structure
from keras_flax._model import UserFormat

# NNX metadata keys naming a Variable's mesh axes, newest first.
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


def adapt(
    module: Any,
    method: Any,
    takes_training: bool,
    *,
    variables: PyTree,
    rng_collections: Any,
    seed: Any,
) -> Model:
    """The `Model` of an NNX module.

    Args:
        module: the `flax.nnx.Module` instance (left as it is; the layer
            writes its values back into it).
        method: None, a method name, or a function taking the module first.
        takes_training: whether the method takes `training`.
        variables, rng_collections: linen's; refused unless None (an NNX
            module holds its variables and RNG streams).
        seed: if not None, every RNG stream of the module is reseeded from
            it (in the layer's copy of the module).
    """
    _checks.nnx_arguments(variables, rng_collections)
    label = type(module).__name__
    _own(module)
    targets = {
        _variables.path_text(path): (path, leaf)
        for path, leaf in nnx.to_flat_state(nnx.state(module))
    }
    copy = nnx.merge(*nnx.split(module))
    # Values sown outside `nnx.capture` (`Module.sow`) are a call's output,
    # not the module's state: none is held, none is kept.
    nnx.pop(copy, nnx.Intermediate)
    if seed is not None:
        _reseed(copy, seed)
    _, params, state = nnx.split(copy, nnx.Param, ...)
    graphdefs = {
        training: _graphdef_in_mode(copy, training)
        for training in (False, True)
    }  # `copy` ends in eval mode; its values are unchanged

    user_invoke = _errors.user_code(invoke)

    def run(
        params: PyTree, state: PyTree, inputs: PyTree, training: bool
    ) -> tuple[Any, Any, Any]:
        """The outputs, new params and new state of one call."""
        called = nnx.merge(graphdefs[bool(training)], params, state)
        kwargs = {"training": training} if takes_training else {}
        outputs = user_invoke(called, method, inputs, kwargs)
        nnx.pop(called, nnx.Intermediate)
        _, new_params, new_state = nnx.split(called, nnx.Param, ...)
        return outputs, new_params, new_state

    def apply(
        params: PyTree, state: PyTree, rng: Any, inputs: PyTree, training: bool
    ) -> tuple[Any, Any]:
        outputs, _, new_state = run(params, state, inputs, training)
        return outputs, new_state

    def write_back(parts: tuple[str, ...]) -> Callable[[Any], None] | None:
        """Copies a variable's values into the user's module."""
        found = targets.get(_variables.path_text(variable_name(parts)))
        if found is None:
            return None
        path, target = found
        if not isinstance(target, nnx.Variable):
            # A plain array attribute (data of the module, not a Variable):
            # held as non-trainable state, written back as an attribute.
            return functools.partial(
                _write_attribute, module, path, target.dtype
            )
        return functools.partial(_write, target)

    def build(spec: Any, layer_name: str) -> tuple[Model, Any] | None:
        """The module built by its first call at `spec` (a module creating
        its variables then: `nnx.bridge.ToNNX` without `lazy_init`), with
        the layer's seed; None where that call creates nothing."""
        inputs = _inputs.placeholders(spec, 1)
        kwargs = {"training": False} if takes_training else {}
        try:
            created = _created(module, method, inputs, kwargs)
        except _errors.UserCodeError as refused:
            if not _unbuilt_bridge(module):
                return None  # the call raises the module's own error
            error = _errors.lazy_build_failed(label, spec, refused.error)
            raise ValueError(error) from refused.error
        if not created:
            return None
        # Built in the user's module, which then holds the variables.
        if seed is not None:
            _reseed(module, seed)
        _errors.user_code(_first_call)(module, method, inputs, kwargs)
        model = adapt(
            module,
            method,
            takes_training,
            variables=None,
            rng_collections=None,
            seed=seed,
        )
        return model.replace(build=None), module

    axes = {}
    for path, leaf in nnx.to_flat_state(nnx.state(copy)):
        found = isinstance(leaf, nnx.Variable) and _sharding(leaf)
        if found:
            axes[_variables.path_text((*path, "value"))] = found

    def quantize(
        rules: list[Any], params: PyTree, state: PyTree, inputs: PyTree
    ) -> tuple[Model, Any]:
        """Qwix's quantized copy of the module at `params` and `state`, in
        eval mode (`_model.Quantization`)."""
        name, target = _quantize.method(module, method)
        current = nnx.merge(graphdefs[False], params, state)
        kwargs = {"training": False} if takes_training else {}
        quantized = _quantize.nnx_module(current, name, rules, inputs, **kwargs)
        model = adapt(
            quantized,
            target,
            takes_training,
            variables=None,
            rng_collections=None,
            seed=None,
        )
        return model, quantized

    # LoRA adapters stay float (they train on the quantized base).
    lora_paths = tuple(
        "/".join(str(part) for part in path)
        for path, node in nnx.iter_graph(copy)
        if isinstance(node, nnx.LoRA)
    )

    def nodes(params: PyTree, state: PyTree, inputs: PyTree) -> Any:
        """The submodules and Variables of the module's graph (a shared one
        at its first path, as `nnx.split` holds it), with the outputs of
        each submodule's first call on `inputs` in eval mode, which
        `nnx.capture` records (traced abstractly; none where it fails)."""
        found: dict[tuple[Any, ...], tuple[str, Any]] = {
            path: (type(node).__name__, None)
            for path, node in nnx.iter_graph(copy)
            if path and isinstance(node, (nnx.Pytree, nnx.Variable))
        }
        capture = nnx.capture(
            _errors.user_code(invoke),
            nnx.Intermediate,
            method_outputs=nnx.Intermediate,
        )
        kwargs = {"training": False} if takes_training else {}

        def call(params: PyTree, state: PyTree, inputs: PyTree) -> None:
            called = nnx.merge(graphdefs[False], params, state)
            _, captured = capture(called, method, inputs, kwargs)
            calls: dict[tuple[Any, ...], Any] = {}
            for path, variable in nnx.to_flat_state(captured):
                *module_path, name = path
                first = variable.get_value()[0]
                if name == "__call__" or tuple(module_path) not in calls:
                    calls[tuple(module_path)] = first
            for path, outputs in calls.items():
                if path in found:
                    label = found[path][0]
                    found[path] = (label, _summary.outputs_shape(outputs))

        try:
            jax.eval_shape(call, params, state, inputs)
        except _errors.UserCodeError:
            pass  # the rows have no output shapes
        return found

    rng_state = frozenset(
        _variables.path_text(path)
        for path, _ in nnx.to_flat_state(nnx.state(copy, nnx.RngState))
    )

    return Model(
        init=None,
        split=lambda raw: (*raw, {}),
        apply=apply,
        params=params,
        state=state,
        names=_names,
        # The module draws from its own RNG streams, held as state.
        rng=Rng(),
        takes_training=True,
        config=config_fn(module, method, None),
        shares_given=True,
        axes=axes,
        rng_state=rng_state,
        user_format=_user_format(write_back),
        fine_tuning=FineTuning(candidates=_candidates, variable_filters=True),
        quantization=Quantization(
            quantize=quantize,
            module_path=lambda parts: "/".join(parts[:-1]),
            float_paths=lora_paths,
        ),
        structure=Structure(path_of=_names, nodes=nodes),
        diagnostics=Diagnostics(label=label, initializer="module"),
        build=build,
    )


def adapt_sized(
    sized: _sizes.SizedCall,
    method: Any,
    takes_training: bool,
    *,
    variables: PyTree,
    rng_collections: Any,
    seed: Any,
) -> Model:
    """The `Model` of an NNX module class whose sizes follow the input
    (`FlaxLayer.input_dim()` among its constructor arguments): constructed
    at build (`Model.build`), then as `adapt` makes it. Arguments as
    `adapt`'s, `sized` the class and its arguments."""
    _checks.nnx_arguments(variables, rng_collections)
    cls = sized.module_class

    def build(spec: Any, layer_name: str) -> tuple[Model, Any]:
        args, kwargs = _sizes.fill(sized.args, sized.kwargs, spec, layer_name)
        module = _errors.user_code(cls)(*args, **kwargs)
        model = adapt(
            module,
            method,
            takes_training,
            variables=None,
            rng_collections=None,
            seed=seed,
        )
        return model, module

    recorded = _serialization.RecordedCall(sized.args, sized.kwargs)
    return Model(
        init=None,
        split=lambda raw: (*raw, {}),
        apply=_unbuilt,
        params=None,
        state=None,
        names=_names,
        rng=Rng(),
        takes_training=True,
        config=config_fn(cls, method, recorded),
        user_format=_user_format(None),
        fine_tuning=FineTuning(candidates=_candidates, variable_filters=True),
        diagnostics=Diagnostics(label=cls.__name__, initializer="module"),
        build=build,
    )


def _names(trainable: bool, parts: tuple[str, ...]) -> tuple[str, ...]:
    return variable_name(parts)


def _user_format(write_back: Any) -> UserFormat:
    """The `nnx.State` format of the variables (`flax_variables`)."""
    return UserFormat(
        view=lambda tree: None if tree is None else nnx.to_pure_dict(tree),
        to_user=_merged,
        from_user=from_user,
        write_back=write_back,
    )


def _merged(params: PyTree, state: PyTree) -> Any:
    """`params` and `state` as one `nnx.State` (empty before a module
    sized from its input is built)."""
    return nnx.merge_state(
        *(nnx.State({}) if tree is None else tree for tree in (params, state))
    )


def _unbuilt(*args: Any) -> Any:
    raise AssertionError("called before build")  # `Model.build` comes first


def _candidates(params: PyTree) -> list[tuple[Any, Any, str]]:
    """Each `nnx.Param`'s path and Variable, as `nnx.Optimizer(...,
    wrt=)` gives them to its filter, and its key."""
    return [
        (path, variable, _variables.path_text((*path, "value")))
        for path, variable in nnx.to_flat_state(params)
    ]


def _first_call(module: Any, method: Any, inputs: PyTree, kwargs: Any) -> None:
    """Calls `method` of `module` as its first call, with Flax's
    `nnx.bridge.lazy_init` (which lets linen modules inside create their
    variables)."""
    nnx.bridge.lazy_init(_bound(module, method), inputs, **kwargs)


def _created(module: Any, method: Any, inputs: PyTree, kwargs: Any) -> list:
    """Paths of the variables the first call of a copy of `module` creates
    (traced abstractly; raises what the module raises as `UserCodeError`).
    Values sown by the call are not variables."""
    graphdef, state = nnx.split(module)
    first_call = _errors.user_code(_first_call)

    def call(state: Any, inputs: PyTree) -> Any:
        copy = nnx.merge(graphdef, state)
        first_call(copy, method, inputs, kwargs)
        return nnx.state(copy, nnx.Not(nnx.Intermediate))

    return _new_paths(state, jax.eval_shape(call, state, inputs))


def _unbuilt_bridge(module: Any) -> bool:
    """Whether `module` holds an `nnx.bridge.ToNNX` never initialised (no
    variables but its RNG state)."""
    return any(
        isinstance(node, nnx.bridge.ToNNX)
        and not jax.tree_util.tree_leaves(
            nnx.state(node, nnx.Not(nnx.RngState))
        )
        for _, node in nnx.iter_graph(module)
    )


def from_user(variables: PyTree) -> Any:
    """An `nnx.State` or pure dict as a pure dict (values sown by the
    module are no state: they are left out)."""
    if isinstance(variables, nnx.State):
        sown = nnx.Not(nnx.Intermediate)
        return nnx.to_pure_dict(nnx.filter_state(variables, sown))
    if isinstance(variables, collections.abc.Mapping):
        return variables
    raise TypeError(_errors.nnx_variables_not_state(variables))


def config_fn(
    module: Any, method: Any, recorded_call: Any
) -> Callable[[], dict[str, Any]]:
    """The `Model.config` of an NNX module (or of its class, given with
    its recorded constructor call): that call when there is one, else its
    class's own `get_config()`."""
    cls = module if isinstance(module, type) else type(module)

    def config() -> dict[str, Any]:
        if recorded_call is not None:
            entry = _serialization.serialize_call(
                cls, recorded_call, "nnx_call"
            )
        elif hasattr(cls, "get_config"):
            entry = _serialization.serialize_nnx(module, None)
        else:
            raise TypeError(_errors.nnx_not_serializable(module))
        return {
            "module": entry,
            "method": _serialization.serialize_method(cls, method),
        }

    return config


def invoke(module: Any, method: Any, inputs: PyTree, kwargs: Any) -> Any:
    """Calls `method` (None, a name, or a function) of `module`."""
    return _bound(module, method)(inputs, **kwargs)


def _bound(module: Any, method: Any) -> Callable[..., Any]:
    """`method` (None for `__call__`, a name, or a function taking the
    module first) of `module`, bound to it."""
    if method is None:
        return module
    if isinstance(method, str):
        return getattr(module, method)
    return types.MethodType(method, module)


def _graphdef_in_mode(module: Any, training: bool) -> Any:
    """The graph of the layer's own copy of the module in a mode.

    `train()` / `eval()` set `deterministic` and `use_running_average` on
    every submodule having them; they are static, part of the graph.
    """
    if training:
        module.train()
    else:
        module.eval()
    return nnx.split(module, nnx.Param, ...)[0]


def _reseed(module: Any, seed: Any) -> None:
    """Reseeds every RNG stream of `module` from `seed`.

    A stacked stream (one key per slice, as `nnx.split_rngs` makes them for
    `nnx.vmap`-created layers) gets one new key per slice, split from the
    stream's key as `split_rngs` splits it (Flax's "match_shape" policy).
    """
    streams = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.RngStream):
            streams.setdefault(node.tag, []).append((path, node.key.shape))
    stacked = [
        _variables.path_text(path)
        for found in streams.values()
        for path, shape in found
        if shape != ()
    ]
    options: dict[str, Any] = {}
    if stacked:
        if "policy" not in inspect.signature(nnx.reseed).parameters:
            raise ValueError(_errors.stacked_streams_without_policy(stacked))
        options["policy"] = "match_shape"
    key = jax.random.key(seed)
    keys: dict[str, Any] = {
        s: jax.random.fold_in(key, _rng.stream_id(s)) for s in streams
    }
    nnx.reseed(module, **options, **keys)


def _sharding(variable: Any) -> tuple[Any, ...] | None:
    metadata = variable.get_metadata()
    for key in _SHARDING_KEYS:
        axes = metadata.get(key)
        if axes is not None:
            return tuple(axes)
    return None


def variable_name(parts: tuple[str, ...]) -> tuple[str, ...]:
    """NNX state paths end in the Variable's `value`: drop it."""
    return parts[:-1] if parts and parts[-1] == "value" else parts


def _new_paths(held: Any, returned: Any) -> list[str]:
    held_paths = {path for path, _ in nnx.to_flat_state(held)}
    return [
        _variables.path_text(path)
        for path, _ in nnx.to_flat_state(returned)
        if path not in held_paths
    ]


def _own(module: Any) -> None:
    """Moves the module's arrays into buffers of the layer's own, one leaf
    at a time, re-pointing the module at each as it goes.

    Keras donates its variables' buffers to every compiled step, so the
    layer holds only buffers it owns: an array nothing else holds is freed
    as soon as its copy is made (the peak is the parameters and the largest
    leaf), and one the user still holds apart from the module (an
    `nnx.clone` made before wrapping, a state snapshot, another layer's
    module) stays valid. Two attributes holding one array get one buffer
    each.
    """
    state = nnx.state(module)
    flat = list(nnx.to_flat_state(state))
    del state
    while flat:
        path, leaf = flat.pop()
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            if isinstance(value, jax.Array):
                leaf.set_value(_copy(value))
        elif isinstance(leaf, jax.Array):
            copied = _copy(leaf)
            del leaf
            _set_leaf(module, path, copied)


def _copy(array: jax.Array) -> jax.Array:
    """A copy in a buffer of its own, where `array` is laid out (a buffer
    copy: no program run)."""
    return jax.device_put(array, may_alias=False)


def _set_leaf(module: Any, path: tuple[Any, ...], value: Any) -> None:
    """Sets the plain array at `path` of `module`'s graph to `value`; an
    immutable container on the way (a tuple in `nnx.data((a, b))`) is
    rebuilt, as its own type, holding it."""
    nodes = [module]
    for key in path[:-1]:
        node = nodes[-1]
        nodes.append(node[key] if _indexed(node) else getattr(node, key))
    for node, key in zip(reversed(nodes), reversed(path), strict=True):
        if not isinstance(node, tuple):
            if _indexed(node):
                node[key] = value
            else:
                setattr(node, key, value)
            return
        items = list(node)
        items[key] = value
        value = _sizes.rebuilt(node, items)


def _indexed(node: Any) -> bool:
    """Whether a graph node holds its children by index or key."""
    return isinstance(node, (list, tuple, dict, nnx.List, nnx.Dict))


def _write(target: Any, value: Any) -> None:
    """Points the NNX Variable `target` at `value`.

    Keras writes the trained values back into its variables at the end of
    each epoch and of `fit`, `evaluate` and `predict`, and when weights are
    loaded; the user's module is re-pointed at each such value, so it holds
    the trained values without being asked, and shares its arrays with
    the layer (one copy of each weight). Where the module's dtype differs
    (a dtype policy given to the layer), it gets a copy in its own dtype.
    """
    current = target.get_value()
    if jax.dtypes.issubdtype(current.dtype, jax.dtypes.prng_key):
        # Key data as JAX's uint32 (PyTorch's tensors of it are int32).
        data = _variables.uint32_key_data(_backends.own_array(value))
        value = jax.random.wrap_key_data(
            data, impl=jax.random.key_impl(current)
        )
    else:
        value = _backends.own_array(value, current.dtype)
    target.set_value(value)


def _write_attribute(
    module: Any, path: tuple[Any, ...], dtype: Any, value: Any
) -> None:
    """Sets the plain array attribute at `path` of `module` to `value`
    (see `_write`)."""
    _set_leaf(module, path, _backends.own_array(value, dtype))
