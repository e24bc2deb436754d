"""A model given as JAX functions (`call_fn`, `init_fn`) as a `Model`.

The arguments are matched by name, as `keras.layers.JaxLayer` matches
them; Haiku's `hk.transform(...)` / `hk.transform_with_state(...)` pairs
fit as they are.
"""

from typing import Any

from keras_flax import _checks
from keras_flax import _errors
from keras_flax import _rng
from keras_flax import _serialization
from keras_flax._model import Diagnostics
from keras_flax._model import Model
from keras_flax._model import PyTree
from keras_flax._model import Rng


def arguments(call_fn: Any, init_fn: Any) -> tuple[list[str], list[str] | None]:
    """The argument names of `call_fn` and of `init_fn` (None without
    one), checked."""
    call_arguments = _checks.function_arguments(
        call_fn, "call_fn", _checks.CALL_FN_ARGUMENTS
    )
    if init_fn is None:
        return call_arguments, None
    init_arguments = _checks.function_arguments(
        init_fn, "init_fn", _checks.INIT_FN_ARGUMENTS
    )
    return call_arguments, init_arguments


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
        raise ValueError(_errors.nothing_to_initialize())
    takes_state = "state" in call_arguments
    takes_training = "training" in call_arguments
    user_call = _errors.user_code(call_fn)
    user_init = None if init_fn is None else _errors.user_code(init_fn)

    def apply(
        params: PyTree, state: PyTree, rng: Any, inputs: PyTree, training: bool
    ) -> tuple[Any, Any]:
        args = {
            "params": params,
            "state": state,
            "rng": rng,
            "inputs": inputs,
            # One trace per mode only if `call_fn` sees the mode.
            "training": training,
        }
        result = user_call(*(args[a] for a in call_arguments))
        if not takes_state:
            return result, None
        return _checks.stateful_result(result)

    def init(rng: Any, inputs: PyTree) -> Any:
        assert user_init is not None and init_arguments is not None
        args = {"rng": rng, "inputs": inputs, "training": True}
        result = user_init(*(args[a] for a in init_arguments))
        return result if takes_state else (result, None)

    def config() -> dict[str, Any | None]:
        return {
            "call_fn": _serialization.serialize_function(call_fn, "call_fn"),
            "init_fn": _serialization.serialize_function(init_fn, "init_fn"),
        }

    return Model(
        init=None if init_fn is None else init,
        split=lambda raw: (*raw, {}),
        apply=apply,
        params=params,
        state=state,
        names=lambda trainable, parts: (
            parts if trainable else ("state", *parts)
        ),
        rng=Rng(
            init=_rng.key_from_seed,
            call=(lambda key: key) if "rng" in call_arguments else None,
        ),
        takes_training=takes_training,
        config=config,
        diagnostics=Diagnostics(
            label="call_fn",
            initializer="init_fn",
            misfit_fix=(
                "Call the layer on inputs of the shape the weights were "
                "made for, or pass {arg}=None with `init_fn` to initialise "
                "new ones."
            ),
        ),
    )
