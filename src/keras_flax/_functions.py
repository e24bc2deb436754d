"""A model given as JAX functions (`call_fn`, `init_fn`) as a `Model`.

The arguments are matched by name, as `keras.layers.JaxLayer` matches
them; Haiku's `hk.transform(...)` / `hk.transform_with_state(...)` pairs
fit as they are.
"""

import dataclasses
import functools
from typing import Any

from keras_flax import _checks
from keras_flax import _rng
from keras_flax import _serialization
from keras_flax import _user_code
from keras_flax._model import Diagnostics
from keras_flax._model import Model
from keras_flax._model import PyTree
from keras_flax._model import Rng


@dataclasses.dataclass(frozen=True)
class _Wrapped:
    """The functions of a model and their argument names (`arguments`)."""

    call_fn: Any
    call_arguments: tuple[str, ...]
    init_fn: Any
    init_arguments: tuple[str, ...] | None

    @property
    def takes_state(self) -> bool:
        return "state" in self.call_arguments


def adapt(
    call_fn: Any,
    call_arguments: Any,
    init_fn: Any,
    init_arguments: Any,
    params: PyTree,
    state: PyTree,
) -> Model:
    """The `Model` of `call_fn` and `init_fn`, whose argument names
    `arguments` gave."""
    has_weights = {"params", "state"} & set(call_arguments)
    if init_fn is None and params is None and state is None and has_weights:
        raise ValueError(nothing_to_initialize())
    init_arguments = None if init_fn is None else tuple(init_arguments)
    wrapped = _Wrapped(call_fn, tuple(call_arguments), init_fn, init_arguments)
    return Model(
        init=None if init_fn is None else functools.partial(_init, wrapped),
        apply=functools.partial(_apply, wrapped),
        params=params,
        state=state,
        names=_names,
        rng=Rng(
            init=_rng.key_from_seed,
            call=(lambda key: key) if "rng" in call_arguments else None,
        ),
        takes_training="training" in call_arguments,
        config=functools.partial(_config, wrapped),
        diagnostics=_DIAGNOSTICS,
    )


def _names(trainable: bool, parts: tuple[str, ...]) -> tuple[str, ...]:
    return parts if trainable else ("state", *parts)


def nothing_to_initialize() -> str:
    return (
        "`init_fn`, `params` and `state` cannot all be `None` when `call_fn` "
        "takes a `params` or a `state` argument. Received: init_fn=None, "
        "params=None, state=None. Pass `init_fn` to create the weights at "
        "build time, or `params=` (and `state=`) with initial values."
    )


def _apply(
    wrapped: _Wrapped,
    params: PyTree,
    state: PyTree,
    rng: Any,
    inputs: PyTree,
    training: bool,
) -> tuple[Any, Any]:
    args = {
        "params": params,
        "state": state,
        "rng": rng,
        "inputs": inputs,
        # One trace per mode only if `call_fn` sees the mode.
        "training": training,
    }
    call_fn = _user_code.user_code(wrapped.call_fn)
    result = call_fn(*(args[a] for a in wrapped.call_arguments))
    if not wrapped.takes_state:
        return result, None
    return _checks.stateful_result(result)


def _init(wrapped: _Wrapped, rng: Any, inputs: PyTree) -> Any:
    assert wrapped.init_arguments is not None  # given with `init_fn`
    args = {"rng": rng, "inputs": inputs, "training": True}
    init_fn = _user_code.user_code(wrapped.init_fn)
    result = init_fn(*(args[a] for a in wrapped.init_arguments))
    raw = result if wrapped.takes_state else (result, None)
    return (*raw, {})  # a misfit result is checked where it is used


def _config(wrapped: _Wrapped) -> dict[str, Any | None]:
    return {
        "call_fn": _serialization.serialize_function(
            wrapped.call_fn, "call_fn"
        ),
        "init_fn": _serialization.serialize_function(
            wrapped.init_fn, "init_fn"
        ),
    }


_DIAGNOSTICS = Diagnostics(
    label="call_fn",
    initializer="init_fn",
    misfit_fix=(
        "Call the layer on inputs of the shape the weights were "
        "made for, or pass {arg}=None with `init_fn` to initialise "
        "new ones."
    ),
)
