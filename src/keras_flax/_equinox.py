"""An Equinox module and its forward method as a `Model`.

The module is split as Equinox splits it (`eqx.partition`): its inexact
arrays (`eqx.is_inexact_array`) are `params`, named by tree path
(`layers/0/weight`); its other arrays and the `eqx.nn.State` made beside
it (`eqx.nn.make_with_state`) are `state`; everything else is static and
stays in the module. `apply` combines them (`eqx.combine`), puts the
module in inference mode outside training (`eqx.nn.inference_mode`) and
calls the method per example (`jax.vmap`, `axis_name="batch"`, as
Equinox's BatchNorm expects), or on the whole batch (`batched=True`).
Importing this file needs `equinox` (the `equinox` extra).
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import equinox as eqx
import jax

from keras_flax import _errors
from keras_flax import _serialization
from keras_flax import _signatures
from keras_flax import _user_code
from keras_flax import _variables
from keras_flax._errors import describe
from keras_flax._errors import names
from keras_flax._model import Call
from keras_flax._model import Diagnostics
from keras_flax._model import FineTuning
from keras_flax._model import Model
from keras_flax._model import Rng

# Config tag of a recorded constructor call (`from_constructor`).
CALL_TAG = "eqx_call"


class Made(NamedTuple):
    """An Equinox module and the `eqx.nn.State` made beside it (None for a
    module without state): what `Model.wrapped` holds."""

    module: eqx.Module
    state: eqx.nn.State | None

    def combined(self, params: Any, held: Any) -> eqx.Module:
        """The module holding `params` and `held` (the layer's values)."""
        _, rest = eqx.partition(self.module, eqx.is_inexact_array)
        arrays, static = eqx.partition(rest, eqx.is_array)
        if held is not None:
            arrays = held["arrays"]
        return eqx.combine(params, arrays, static)

    def state_with(self, held: Any) -> eqx.nn.State | None:
        """The `eqx.nn.State` holding the layer's state values, or None."""
        if self.state is None or held is None:
            return self.state
        indices = _state_indices(self.module)
        return _with_values(self.state, indices, held["state"])


@dataclasses.dataclass(frozen=True)
class _Wrapped:
    """What `apply` of an adapted Equinox module works on.

    Attributes:
        fn: the method, `fn(module, x, ...)`.
        stateful: whether it takes and returns `state`.
        takes_key: whether it takes `key`.
        batched: whether it takes the whole batch (else it is vmapped).
        arrays: the module's arrays that are not inexact (held as state).
        static: everything else of the module.
        state: the `eqx.nn.State` given, or None.
        indices: the module's `eqx.nn.StateIndex`es by path text.
    """

    fn: Callable[..., Any]
    stateful: bool
    takes_key: bool
    batched: bool
    arrays: Any
    static: Any
    state: eqx.nn.State | None
    indices: dict[str, eqx.nn.StateIndex]


def adapt(
    module: eqx.Module | Call,
    method: str | Callable | None,
    *,
    state: eqx.nn.State | None,
    batched: bool,
) -> Model:
    """The `Model` of an Equinox module.

    Args:
        module: the `equinox.Module` instance (left as it is), or a `Call`
            constructing it (through `eqx.nn.make_with_state`).
        method: None (`__call__`), a method name, or a function taking the
            module first.
        state: the `eqx.nn.State` made beside the module, or None.
        batched: whether the method takes the whole batch (else it is
            applied per example).
    """
    call = module if isinstance(module, Call) else None
    if isinstance(module, Call):
        module, state = make_with_state(
            module.module_class, *module.args, **module.kwargs
        )
    wrapped = _wrapped(module, method, state, batched)
    return Model(
        init=None,
        apply=functools.partial(_apply, wrapped),
        params=eqx.filter(module, eqx.is_inexact_array),
        state=_held(wrapped),
        names=_names,
        rng=Rng(call=(lambda key: key) if wrapped.takes_key else None),
        takes_training=True,
        config=functools.partial(_config, module, method, batched, call),
        wrapped=Made(module, state),
        fine_tuning=_FINE_TUNING,
        diagnostics=Diagnostics(
            label=type(module).__name__, initializer="module"
        ),
    )


def _held(wrapped: _Wrapped) -> dict[str, Any] | None:
    """The state held: the module's other arrays and the `eqx.nn.State`'s
    values by index path (None where there are none)."""
    held = {
        "arrays": wrapped.arrays,
        "state": _by_index(wrapped.state, wrapped.indices),
    }
    return held if jax.tree_util.tree_leaves(held) else None


def _names(trainable: bool, parts: tuple[str, ...]) -> tuple[str, ...]:
    return parts if trainable or parts[0] == "state" else parts[1:]


def _wrapped(
    module: eqx.Module,
    method: str | Callable | None,
    state: eqx.nn.State | None,
    batched: bool,
) -> _Wrapped:
    """What `apply` works on, the method and `state` checked."""
    fn, signature = _method(module, method)
    stateful = "state" in signature
    if stateful and state is None:
        raise ValueError(equinox_state_missing(type(module).__name__))
    indices = _state_indices(module)
    if state is not None:
        _check_state(module, state, stateful, indices)
    _, rest = eqx.partition(module, eqx.is_inexact_array)
    arrays, static = eqx.partition(rest, eqx.is_array)
    takes_key = "key" in signature
    return _Wrapped(
        fn, stateful, takes_key, batched, arrays, static, state, indices
    )


def equinox_state_missing(label: str) -> str:
    return (
        f"The method of {label} takes `state` (a stateful module: "
        "BatchNorm, SpectralNorm), so the layer needs the `eqx.nn.State` "
        "made beside the module. Received: state=None. Fix: "
        f"`module, state = eqx.nn.make_with_state({label})(...)`, then "
        "`EquinoxLayer(module, state=state)`, or "
        f"`EquinoxLayer.from_constructor({label}, ...)`."
    )


def _called(
    wrapped: _Wrapped, module: Any, x: Any, state: Any, key: Any
) -> tuple[Any, Any]:
    """`(outputs, new state)` (None for a module without state)."""
    fn = _user_code.user_code(wrapped.fn)
    kwargs = {"key": key} if wrapped.takes_key else {}
    if wrapped.stateful:
        outputs, new_state = fn(module, x, state, **kwargs)
        return outputs, new_state
    return fn(module, x, **kwargs), None


def _apply(
    wrapped: _Wrapped,
    params: Any,
    held_now: Any,
    rng: Any,
    inputs: Any,
    training: bool,
) -> tuple[Any, Any]:
    arrays = wrapped.arrays if held_now is None else held_now["arrays"]
    module = eqx.combine(params, arrays, wrapped.static)
    if not training:
        module = eqx.nn.inference_mode(module)
    eqx_state = None
    if wrapped.stateful:
        # A stateful module was given its state (checked by `adapt`).
        assert held_now is not None and wrapped.state is not None
        eqx_state = _with_values(
            wrapped.state, wrapped.indices, held_now["state"]
        )
    outputs, new_state = _per_example(wrapped, module, inputs, eqx_state, rng)
    if held_now is None:
        return outputs, None
    values = held_now["state"]
    if wrapped.stateful:
        values = _by_index(new_state, wrapped.indices)
    return outputs, {"arrays": held_now["arrays"], "state": values}


def _per_example(
    wrapped: _Wrapped, module: Any, inputs: Any, eqx_state: Any, rng: Any
) -> tuple[Any, Any]:
    """The method on the batch: per example (`jax.vmap`, its key split
    per example), or on the whole batch where `batched`."""
    if wrapped.batched:
        return _called(wrapped, module, inputs, eqx_state, rng)
    size = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    keys = None if rng is None else jax.random.split(rng, size)
    return jax.vmap(
        lambda x, k: _called(wrapped, module, x, eqx_state, k),
        in_axes=(0, None if keys is None else 0),
        out_axes=(0, None),
        axis_name="batch",
    )(inputs, keys)


_FINE_TUNING = FineTuning(
    candidates=_variables.keyed_leaves, variable_filters=False
)


def _config(
    module: eqx.Module,
    method: str | Callable | None,
    batched: bool,
    call: Call | None,
) -> dict[str, Any]:
    """The `Model.config` of an Equinox module: its recorded constructor
    call (refused without one)."""
    if call is None:
        raise TypeError(equinox_not_serializable(module))
    return {
        "module": _serialization.serialize_call(type(module), call, CALL_TAG),
        "method": _serialization.serialize_method(type(module), method),
        "batched": batched,
    }


def equinox_not_serializable(module: Any) -> str:
    name = type(module).__name__
    return (
        "An EquinoxLayer can be saved in a `.keras` file when it was made "
        "with `EquinoxLayer.from_constructor(cls, *args, **kwargs)`, which "
        f"records the constructor call. Received: module={name}, built "
        f"outside the layer. Fix: EquinoxLayer.from_constructor({name}, "
        "..., key=jax.random.key(0)); `model.save_weights(...)` works in any "
        "case."
    )


def constructor_call(config: dict[str, Any]) -> tuple[type, list, dict]:
    """`(class, args, kwargs)` of a saved constructor call."""
    return _serialization.recorded_call(config, CALL_TAG, eqx.Module, "equinox")


def make_with_state(
    module_class: type, *args: Any, **kwargs: Any
) -> tuple[eqx.Module, eqx.nn.State | None]:
    """`(module, state)` as `eqx.nn.make_with_state` builds them (state
    None for a class holding none)."""
    module, state = eqx.nn.make_with_state(module_class)(*args, **kwargs)
    if not jax.tree_util.tree_leaves(state):
        state = None
    return module, state


def _method(
    module: eqx.Module, method: str | Callable | None
) -> tuple[Callable, list[str]]:
    """`(fn(module, x, ...), parameter names after the module)`."""
    if method is None:
        fn = type(module).__call__
    elif isinstance(method, str):
        fn = getattr(type(module), method, None)
        if not callable(fn):
            defined = _signatures.defined_methods(module, eqx.Module)
            raise ValueError(
                _errors.unknown_method(type(module).__name__, method, defined)
            )
    elif callable(method):
        fn = getattr(method, "__func__", method)  # a bound method: its own
    else:
        raise TypeError(_errors.bad_method_type(method))
    parameters = list(inspect.signature(fn).parameters.values())[1:]
    if not parameters:
        raise ValueError(equinox_method_without_inputs(fn))
    _check_fillable(fn, parameters)
    return fn, [p.name for p in parameters]


def equinox_method_without_inputs(fn: Callable[..., Any]) -> str:
    return (
        "`method` must take the module and then the inputs: "
        "`(module, x, *, key=None)` or `(module, x, state, *, key=None)`. "
        f"Received: method={describe(fn)}, which takes {names(fn)}. Fix: "
        "`def method(module, x): return module(x)`."
    )


def _check_fillable(fn: Callable, parameters: list[inspect.Parameter]) -> None:
    """Refuses a method with a required argument the layer cannot fill:
    it gives the input (the first), `state` and `key`."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for parameter in parameters[1:]:
        filled = (
            parameter.name in ("state", "key") or parameter.kind in variadic
        )
        if filled or parameter.default is not inspect.Parameter.empty:
            continue
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(
            f"`method` {name} has the required argument `{parameter.name}`, "
            "which EquinoxLayer cannot fill: it passes the input (the first "
            f"argument, `{parameters[0].name}`), `state` for a stateful "
            "module and `key`. Received: method="
            f"{name}{inspect.signature(fn)}. Fix: give `{parameter.name}` a "
            "default, or pass a function that fills it: "
            f"`def forward(module, x): return module(x, {parameter.name}=...)`."
        )


def _state_indices(module: eqx.Module) -> dict[str, eqx.nn.StateIndex]:
    """The module's `eqx.nn.StateIndex`es, by path text."""
    found = jax.tree_util.tree_flatten_with_path(
        module, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
    )[0]
    return {
        _variables.path_text(path): index
        for path, index in found
        if isinstance(index, eqx.nn.StateIndex)
    }


def _check_state(
    module: eqx.Module,
    state: Any,
    stateful: bool,
    indices: dict[str, eqx.nn.StateIndex],
) -> None:
    """Refuses a `state` that is not the module's `eqx.nn.State`, or that
    its method does not take."""
    name = type(module).__name__
    fix = (
        "Fix: `module, state = eqx.nn.make_with_state(Class)(...)`, then "
        "`EquinoxLayer(module, state=state)`."
    )
    if not isinstance(state, eqx.nn.State):
        raise TypeError(
            "`state` must be the `eqx.nn.State` that `eqx.nn.make_with_state`"
            f" returned beside the {name}, or None. Received: state of type "
            f"{type(state).__name__}. {fix}"
        )
    if not stateful:
        raise ValueError(
            f"`state` was given, but the method of {name} takes no `state` "
            "argument, so it would never be used. Received: an eqx.nn.State."
            " Drop `state=`, or give a method `(module, x, state, *, "
            "key=None) -> (y, state)`."
        )
    absent = []
    for path, index in indices.items():
        try:
            state.get(index)
        except KeyError:
            absent.append(path or "<module>")
    if absent or not indices:
        raise ValueError(
            f"`state` must hold the state of this {name}'s `StateIndex`es; "
            f"it lacks {absent or 'them (the module has none)'}. Received: "
            f"an eqx.nn.State made beside another module. {fix}"
        )


def _by_index(
    state: eqx.nn.State | None, indices: dict[str, eqx.nn.StateIndex]
) -> dict[str, Any]:
    """The values of `state` by the path of their index in the module."""
    if state is None:
        return {}
    return {path: state.get(index) for path, index in indices.items()}


def _with_values(
    state: eqx.nn.State, indices: dict[str, eqx.nn.StateIndex], values: Any
) -> eqx.nn.State:
    """`state` holding `values` (by index path), rebuilt as a PyTree: the
    layer's variables hold what it held, but not JAX's weak types, which
    `State.set` would refuse."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    position = {id(leaf): i for i, leaf in enumerate(leaves)}
    new = list(leaves)
    for path, index in indices.items():
        held = jax.tree_util.tree_leaves(state.get(index))
        given = jax.tree_util.tree_leaves(values[path])
        for leaf, value in zip(held, given, strict=True):
            new[position[id(leaf)]] = value
    return jax.tree_util.tree_unflatten(treedef, new)
