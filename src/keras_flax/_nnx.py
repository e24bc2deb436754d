"""A Flax NNX module as a `Model`, through `nnx.split` / `nnx.merge`.

An NNX module is built eagerly, so its variables exist before the layer
does: they are the given `params` (every `nnx.Param`) and `state` (every
other `nnx.Variable`: batch statistics, RNG keys and counts, caches, user
variable types, plain array attributes). `apply` merges them into a module
in train or eval mode, calls it, and splits the new state out; the layer's
values are written back into the user's module (`write_back`).
"""

import collections.abc
import dataclasses
import functools
import types
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from keras_flax import _checks
from keras_flax import _inputs
from keras_flax import _nnx_arrays
from keras_flax import _quantize
from keras_flax import _serialization
from keras_flax import _sizes
from keras_flax import _summary
from keras_flax import _user_code
from keras_flax import _variables
from keras_flax._errors import describe
from keras_flax._model import Call
from keras_flax._model import Diagnostics
from keras_flax._model import FineTuning
from keras_flax._model import Live
from keras_flax._model import Model
from keras_flax._model import PyTree
from keras_flax._model import Quantization
from keras_flax._model import Rng
from keras_flax._model import Structure
from keras_flax._model import UserFormat

# NNX metadata keys naming a Variable's mesh axes, newest first.
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


@dataclasses.dataclass(frozen=True)
class _Wrapped:
    """What the functions of an adapted NNX module work on.

    Attributes:
        module: the user's module, into which the layer writes its values.
        method: None, a method name, or a function taking the module first.
        takes_training: whether the method takes `training`.
        seed: the seed its RNG streams are reseeded from, or None.
        graphdefs: the graph of the layer's copy in eval (False) and train
            (True) mode.
        targets: the user's module's leaves `(path, leaf)` by path text.
        call: the recorded constructor call that made it, or None.
    """

    module: Any
    method: Any
    takes_training: bool
    seed: Any
    graphdefs: Mapping[bool, Any]
    targets: Mapping[str, tuple[Any, Any]]
    call: Call | None

    def kwargs(self, training: bool) -> dict[str, bool]:
        return {"training": training} if self.takes_training else {}


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
            writes its values back into it), or a `Call` constructing it.
        method: None, a method name, or a function taking the module first.
        takes_training: whether the method takes `training`.
        variables, rng_collections: linen's; refused unless None (an NNX
            module holds its variables and RNG streams).
        seed: if not None, every RNG stream of the module is reseeded from
            it (in the layer's copy of the module).
    """
    _checks.nnx_arguments(variables, rng_collections)
    call = module if isinstance(module, Call) else None
    if call is not None:
        module = call.module_class(*call.args, **call.kwargs)
    _nnx_arrays.own(module)
    copy = _layer_copy(module, seed)
    wrapped = _Wrapped(
        module,
        method,
        takes_training,
        seed,
        _graphdefs(copy),
        _leaves(module),
        call,
    )
    _, params, state = nnx.split(copy, nnx.Param, ...)
    return _model(wrapped, copy).replace(params=params, state=state)


def adapt_sized(
    call: Call,
    method: Any,
    takes_training: bool,
    *,
    variables: PyTree,
    rng_collections: Any,
    seed: Any,
) -> Model:
    """The `Model` of an NNX module class whose sizes follow the input
    (`FlaxLayer.input_dim()` among the arguments of `call`): constructed
    at build (`Live.build`), then as `adapt` makes it. Arguments as
    `adapt`'s."""
    _checks.nnx_arguments(variables, rng_collections)
    cls = call.module_class
    return Model(
        init=None,
        apply=_unbuilt,
        params=None,
        state=None,
        names=_names,
        rng=Rng(),
        takes_training=True,
        config=functools.partial(_config, cls, method, call),
        user_format=_user_format(None),
        fine_tuning=_FINE_TUNING,
        live=Live(
            build=functools.partial(
                _build_sized, call, method, takes_training, seed
            )
        ),
        diagnostics=Diagnostics(label=cls.__name__, initializer="module"),
    )


def _model(wrapped: _Wrapped, copy: Any) -> Model:
    """The model of `wrapped`, without its weights; `copy` the layer's copy
    of the module."""
    module = wrapped.module
    return Model(
        init=None,
        apply=functools.partial(_apply, wrapped),
        params=None,
        state=None,
        names=_names,
        # The module draws from its own RNG streams, held as state.
        rng=Rng(),
        takes_training=True,
        config=functools.partial(_config, module, wrapped.method, wrapped.call),
        axes=_axes(copy),
        wrapped=module,
        user_format=_user_format(functools.partial(_write_back, wrapped)),
        fine_tuning=_FINE_TUNING,
        quantization=Quantization(
            quantize=functools.partial(_quantized, wrapped),
            module_path=lambda parts: "/".join(parts[:-1]),
            float_paths=_lora_paths(copy),
        ),
        structure=Structure(
            path_of=_names,
            nodes=functools.partial(_nodes, wrapped, _graph_nodes(copy)),
        ),
        live=Live(
            rng_state=_rng_state(copy),
            build=functools.partial(_build, wrapped),
        ),
        diagnostics=Diagnostics(
            label=type(module).__name__, initializer="module"
        ),
    )


def _layer_copy(module: Any, seed: Any) -> Any:
    """The layer's own copy of `module` (its arrays shared), reseeded from
    `seed` where given. Values sown outside `nnx.capture` (`Module.sow`)
    are a call's output, not the module's state: none is held."""
    copy = nnx.merge(*nnx.split(module))
    nnx.pop(copy, nnx.Intermediate)
    if seed is not None:
        _nnx_arrays.reseed(copy, seed)
    return copy


def _graphdefs(copy: Any) -> dict[bool, Any]:
    """The graph of `copy` in eval (False) and train (True) mode; `copy`
    ends in eval mode, its values unchanged."""
    return {
        training: _graphdef_in_mode(copy, training)
        for training in (False, True)
    }


def _leaves(module: Any) -> dict[str, tuple[Any, Any]]:
    return {
        _variables.path_text(path): (path, leaf)
        for path, leaf in nnx.to_flat_state(nnx.state(module))
    }


def _apply(
    wrapped: _Wrapped,
    params: PyTree,
    state: PyTree,
    rng: Any,
    inputs: PyTree,
    training: bool,
) -> tuple[Any, Any]:
    """The outputs and new state of one call (the module draws from its
    own RNG streams: `rng` is None)."""
    called = nnx.merge(wrapped.graphdefs[bool(training)], params, state)
    outputs = _user_code.user_code(invoke)(
        called, wrapped.method, inputs, wrapped.kwargs(training)
    )
    nnx.pop(called, nnx.Intermediate)
    _, _, new_state = nnx.split(called, nnx.Param, ...)
    return outputs, new_state


def _write_back(
    wrapped: _Wrapped, parts: tuple[str, ...]
) -> Callable[[Any], None] | None:
    """Copies a variable's values into the user's module."""
    found = wrapped.targets.get(_variables.path_text(variable_name(parts)))
    if found is None:
        return None
    path, target = found
    if not isinstance(target, nnx.Variable):
        # A plain array attribute (data of the module, not a Variable):
        # held as non-trainable state, written back as an attribute.
        return functools.partial(
            _nnx_arrays.write_attribute, wrapped.module, path, target.dtype
        )
    return functools.partial(_nnx_arrays.write, target)


def _build(wrapped: _Wrapped, spec: Any, layer_name: str) -> Model | None:
    """The module built by its first call at `spec` (a module creating its
    variables then: `nnx.bridge.ToNNX` without `lazy_init`), with the
    layer's seed; None where that call creates nothing."""
    module, method = wrapped.module, wrapped.method
    inputs = _inputs.placeholders(spec, 1)
    kwargs = wrapped.kwargs(False)
    created = _user_code.attempt(_created, module, method, inputs, kwargs)
    if isinstance(created, _user_code.Refused):
        if not _unbuilt_bridge(module):
            return None  # the call raises the module's own error
        label = type(module).__name__
        error = lazy_build_failed(label, spec, created.error)
        raise ValueError(error) from created.error
    if not created:
        return None
    # Built in the user's module, which then holds the variables.
    if wrapped.seed is not None:
        _nnx_arrays.reseed(module, wrapped.seed)
    _user_code.user_code(_first_call)(module, method, inputs, kwargs)
    model = adapt(
        module,
        method,
        wrapped.takes_training,
        variables=None,
        rng_collections=None,
        seed=wrapped.seed,
    )
    assert model.live is not None  # an NNX module's model is live
    return model.replace(live=dataclasses.replace(model.live, build=None))


def lazy_build_failed(cls_name: str, spec: Any, error: Any) -> str:
    return (
        f"`module` {cls_name} creates its variables when first called, and "
        "that call failed when the layer was built. The module raised: "
        f"{type(error).__name__}: {error}. Received: inputs {spec}. Call "
        "the layer on inputs of the shape the module is "
        "written for (`keras.Input(shape=...)`), or build the module "
        "yourself first (`nnx.bridge.lazy_init(module, x)`)."
    )


def _build_sized(
    call: Call,
    method: Any,
    takes_training: bool,
    seed: Any,
    spec: Any,
    layer_name: str,
) -> Model:
    """The module `call` constructs for inputs of `spec`, adapted."""
    args, kwargs = _sizes.fill(call.args, call.kwargs, spec, layer_name)
    module = _user_code.user_code(call.module_class)(*args, **kwargs)
    return adapt(
        module,
        method,
        takes_training,
        variables=None,
        rng_collections=None,
        seed=seed,
    )


def _axes(copy: Any) -> dict[str, tuple[Any, ...]]:
    """The mesh axes of each Variable that names them, by path text."""
    axes = {}
    for path, leaf in nnx.to_flat_state(nnx.state(copy)):
        found = isinstance(leaf, nnx.Variable) and _sharding(leaf)
        if found:
            axes[_variables.path_text((*path, "value"))] = found
    return axes


def _quantized(
    wrapped: _Wrapped,
    rules: list[Any],
    params: PyTree,
    state: PyTree,
    inputs: PyTree,
) -> Model:
    """Qwix's quantized copy of the module at `params` and `state`, in eval
    mode (`_model.Quantization`)."""
    name, target = _quantize.method(wrapped.module, wrapped.method)
    current = nnx.merge(wrapped.graphdefs[False], params, state)
    kwargs = wrapped.kwargs(False)
    quantized = _quantize.nnx_module(current, name, rules, inputs, **kwargs)
    return adapt(
        quantized,
        target,
        wrapped.takes_training,
        variables=None,
        rng_collections=None,
        seed=None,
    )


def _lora_paths(copy: Any) -> tuple[str, ...]:
    """The module paths of LoRA adapters, which stay float (they train on
    the quantized base)."""
    return tuple(
        "/".join(str(part) for part in path)
        for path, node in nnx.iter_graph(copy)
        if isinstance(node, nnx.LoRA)
    )


def _graph_nodes(copy: Any) -> dict[tuple[Any, ...], str]:
    """The class name of each submodule and Variable of the module's graph
    (a shared one at its first path, as `nnx.split` holds it), by path."""
    return {
        path: type(node).__name__
        for path, node in nnx.iter_graph(copy)
        if path and isinstance(node, (nnx.Pytree, nnx.Variable))
    }


def _nodes(
    wrapped: _Wrapped,
    labels: Mapping[tuple[Any, ...], str],
    params: PyTree,
    state: PyTree,
    inputs: PyTree,
) -> Any:
    """The submodules and Variables (`labels`), with the outputs of each
    submodule's first call on `inputs` in eval mode, which `nnx.capture`
    records (traced abstractly; none where it fails)."""
    found: dict[tuple[Any, ...], tuple[str, Any]] = {
        path: (label, None) for path, label in labels.items()
    }
    calls = _user_code.attempt(
        jax.eval_shape,
        functools.partial(_first_outputs, wrapped),
        params,
        state,
        inputs,
    )
    if isinstance(calls, _user_code.Refused):
        return found  # the rows have no output shapes
    for path, outputs in calls.items():
        if path in found:
            found[path] = (found[path][0], _summary.outputs_shape(outputs))
    return found


def _first_outputs(
    wrapped: _Wrapped, params: PyTree, state: PyTree, inputs: PyTree
) -> dict[tuple[Any, ...], Any]:
    """The outputs of each submodule's first call (its `__call__`'s where
    it has one), by module path."""
    capture = nnx.capture(
        _user_code.user_code(invoke),
        nnx.Intermediate,
        method_outputs=nnx.Intermediate,
    )
    called = nnx.merge(wrapped.graphdefs[False], params, state)
    _, captured = capture(called, wrapped.method, inputs, wrapped.kwargs(False))
    calls: dict[tuple[Any, ...], Any] = {}
    for path, variable in nnx.to_flat_state(captured):
        *module_path, name = path
        first = variable.get_value()[0]
        if name == "__call__" or tuple(module_path) not in calls:
            calls[tuple(module_path)] = first
    return calls


def _rng_state(copy: Any) -> frozenset[str]:
    return frozenset(
        _variables.path_text(path)
        for path, _ in nnx.to_flat_state(nnx.state(copy, nnx.RngState))
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


_FINE_TUNING = FineTuning(candidates=_candidates, variable_filters=True)


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
    first_call = _user_code.user_code(_first_call)

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
    raise TypeError(nnx_variables_not_state(variables))


def nnx_variables_not_state(variables: PyTree) -> str:
    return (
        "`flax_variables` of an NNX layer takes an `nnx.State` (as "
        "`nnx.state(model)` returns) or a pure dict (as `nnx.to_pure_dict` "
        f"returns). Received: flax_variables={describe(variables)}. Fix: "
        "`layer.flax_variables = nnx.state(model)`."
    )


def _config(module: Any, method: Any, call: Call | None) -> dict[str, Any]:
    """The `Model.config` of an NNX module (or of its class, given with
    its recorded constructor call): that call when there is one, else its
    class's own `get_config()`."""
    cls = module if isinstance(module, type) else type(module)
    if call is not None:
        entry = _serialization.serialize_call(cls, call, "nnx_call")
    elif hasattr(cls, "get_config"):
        entry = _serialization.serialize_nnx(module, None)
    else:
        raise TypeError(nnx_not_serializable(module))
    return {
        "module": entry,
        "method": _serialization.serialize_method(cls, method),
    }


def nnx_not_serializable(module: Any) -> str:
    name = type(module).__name__
    return (
        "A FlaxLayer wrapping an NNX module can be saved when the module "
        "class defines `get_config()` / `from_config()`, or when the layer "
        "was made with `FlaxLayer.from_nnx(cls, *args, **kwargs)`, which "
        f"records the constructor call. Received: module={name}, with "
        f"neither. Build the layer with FlaxLayer.from_nnx({name}, ..., "
        f"rngs=nnx.Rngs(0)), or define get_config/from_config on {name}; "
        "`model.save_weights(...)` works in any case."
    )


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
