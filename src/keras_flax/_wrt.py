"""`wrt`: the parameters `fit` trains, chosen with Flax NNX's filters.

A filter is read as NNX reads it (`nnx.filterlib.to_predicate`): a Variable
type, a string (a tag), `nnx.PathContains`, `nnx.Any` / `nnx.All` /
`nnx.Not`, `...` or True (every parameter), a list or tuple (any of them),
or a function `(path, value) -> bool`. For NNX it is given each
`nnx.Param`'s path and Variable, as `nnx.Optimizer(model, tx, wrt=...)`
gives them; for linen, each parameter's path inside `params` (a tuple of
strings) and its array. Parameters it leaves out are held as non-trainable
weights.

A filter is saved as its predicate's parts: NNX's filters by their
arguments, Variable types and functions by import path.
"""

import inspect
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

from flax import nnx

from keras_flax import _errors
from keras_flax import _names
from keras_flax import _serialization
from keras_flax import _variables
from keras_flax._errors import describe
from keras_flax._errors import more
from keras_flax._errors import names

# NNX's filters, each a predicate `(path, value) -> bool`.
_FILTERS = (
    nnx.WithTag,
    nnx.PathContains,
    nnx.filterlib.PathIn,
    nnx.OfType,
    nnx.Any,
    nnx.All,
    nnx.Not,
    nnx.Everything,
    nnx.Nothing,
)
# Those that test what linen parameters lack: a Variable's type or tag.
_VARIABLE_FILTERS = (nnx.OfType, nnx.WithTag)


def predicate(wrt: Any, fine_tuning: Any, label: str) -> Any:
    """The predicate of the filter `wrt`, or None for None (every
    parameter).

    Refuses a model that cannot choose its parameters (`fine_tuning` is
    None: the `Model` has no `FineTuning`), what NNX does not read as a
    filter, a function not taking `(path, value)`, and filters on Variable
    types or tags where the values are no Variables (linen).
    """
    if wrt is None:
        return None
    if fine_tuning is None:
        raise TypeError(wrt_unsupported(wrt, label))
    if not _is_filter(wrt):
        raise TypeError(wrt_not_a_filter(wrt))
    found = nnx.filterlib.to_predicate(wrt)
    for part in _parts(found):
        if not isinstance(part, _FILTERS) and not _takes_path_and_value(part):
            raise TypeError(wrt_bad_function(wrt, part))
    if not fine_tuning.variable_filters:
        typed = [p for p in _parts(found) if isinstance(p, _VARIABLE_FILTERS)]
        if typed:
            raise TypeError(wrt_typed_for_linen(wrt, typed))
    return found


def wrt_not_a_filter(wrt: Any) -> str:
    return (
        "`wrt` must be a Flax NNX filter choosing the parameters that train. "
        f"Received: wrt={describe(wrt)}. {_WRT_FIX}"
    )


def wrt_unsupported(wrt: Any, label: str) -> str:
    return (
        f"`wrt` chooses among the parameters of a model that names them; "
        f"{label} gives its weights as one tree. Received: "
        f"wrt={describe(wrt)}. Fix: split the trainable weights from the "
        "rest yourself (`params` and `state`), or pass `trainable=False` to "
        "train none."
    )


def wrt_bad_function(wrt: Any, fn: Callable[..., Any]) -> str:
    part = "" if fn is wrt else f", holding {describe(fn)},"
    return (
        "`wrt` functions are called as `fn(path, value)` and return whether "
        f"the parameter trains. Received: wrt={describe(wrt)}{part} which "
        f"takes {names(fn)}. Fix: "
        "`def trains(path, value): return 'head' in path`."
    )


def wrt_typed_for_linen(wrt: Any, typed: Any) -> str:
    listed = ", ".join(repr(p) for p in typed[:4]) + more(typed, 4)
    return (
        "`wrt` chooses linen parameters by their path inside `params`; they "
        "have no Variable type or tag to filter on. Received: "
        f"wrt={describe(wrt)}, which tests {listed}. Fix: filter on paths, "
        "e.g. `wrt=nnx.PathContains('head')` or "
        "`wrt=nnx.Not(nnx.PathContains('backbone'))`, or pass a function "
        "`(path, value) -> bool`."
    )


def left_out(
    wrt: Any, found: Any, label: str, candidates: Any
) -> frozenset[Any]:
    """The parameters that `found` (the predicate of `wrt`) leaves out.

    Args:
        wrt: the filter, as given (for messages).
        found: its predicate, or None (every parameter trains).
        label: what messages call the model.
        candidates: `(path, value, key)` of each parameter: the path and
            value the filter is given, and the key returned for it
            (`FineTuning.candidates`).

    Returns:
        The keys of the parameters left out (a frozenset).

    Raises:
        ValueError: where it selects none of them.
    """
    if found is None:
        return frozenset()
    out = frozenset(
        key for path, value, key in candidates if not found(path, value)
    )
    if candidates and len(out) == len(candidates):
        paths = [_variables.path_text(path) for path, _, _ in candidates]
        raise ValueError(wrt_selects_nothing(wrt, label, paths))
    return out


def wrt_selects_nothing(wrt: Any, label: str, candidates: Any) -> str:
    listed = ", ".join(candidates[:8]) + more(candidates, 8)
    return (
        f"`wrt` selects none of the parameters of {label}, so nothing would "
        f"train. Received: wrt={describe(wrt)}; the parameters are: "
        f"{listed}. Fix: pass a filter matching some of them, or wrt=None "
        "to train every parameter (or `trainable=False` to train none)."
    )


def _is_filter(wrt: Any) -> bool:
    if isinstance(wrt, (list, tuple)):
        return all(_is_filter(f) for f in wrt)
    return (
        wrt is None
        or wrt is Ellipsis
        or isinstance(wrt, (str, type, bool))
        or callable(wrt)
    )


def _parts(found: Any) -> Iterator[Any]:
    """`found` and the predicates it is made of."""
    yield found
    if isinstance(found, (nnx.Any, nnx.All)):
        for part in found.predicates:
            yield from _parts(part)
    elif isinstance(found, nnx.Not):
        yield from _parts(found.predicate)


def _takes_path_and_value(fn: Callable[..., Any]) -> bool:
    try:
        inspect.signature(fn).bind("path", "value")
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): let it run
        return True
    return True


# Saving.


def to_config(wrt: Any) -> Any:
    """A JSON-ready config of the filter `wrt` (None for None)."""
    if wrt is None:
        return None
    return _encode(wrt, nnx.filterlib.to_predicate(wrt))


def from_config(config: dict[str, Any]) -> Any:
    """The predicate saved by `to_config`."""
    if config is None:
        return None
    return _decode(config)


def _encode(wrt: Any, found: Any) -> Any:
    if isinstance(found, nnx.Everything):
        return True
    if isinstance(found, nnx.Nothing):
        return False
    if isinstance(found, nnx.WithTag):
        return found.tag  # a string is a tag
    if isinstance(found, nnx.PathContains):
        return {"path_contains": found.key, "exact": found.exact}
    if isinstance(found, nnx.filterlib.PathIn):
        paths = sorted((list(p) for p in found.paths), key=repr)
        return {"path_in": paths}
    if isinstance(found, (nnx.Any, nnx.All)):
        kind = "any" if isinstance(found, nnx.Any) else "all"
        return {kind: [_encode(wrt, p) for p in found.predicates]}
    if isinstance(found, nnx.Not):
        return {"not": _encode(wrt, found.predicate)}
    try:
        if isinstance(found, nnx.OfType):
            return {"type": _serialization.import_path(found.type, "wrt")}
        return {"function": _serialization.serialize_function(found, "wrt")}
    except _serialization.UnserializableError as error:
        part = getattr(found, "type", found)
        raise TypeError(wrt_not_serializable(wrt, part)) from error


def wrt_not_serializable(wrt: Any, part: Any) -> str:
    return (
        "`wrt` cannot be saved in a model config: the filter "
        f"{describe(part)} has no import path. Received: wrt={describe(wrt)}. "
        "Fix: define the function at the top level of a module (or register "
        "it with `keras.saving.register_keras_serializable`), or use NNX's "
        "filters (a Variable type, `nnx.PathContains(...)`, `nnx.Any(...)`); "
        "`model.save_weights(...)` works in any case."
    )


def _decode(config: dict[str, Any]) -> Any:
    if isinstance(config, (bool, str)):
        return nnx.filterlib.to_predicate(config)
    if isinstance(config, dict) and len(config) in (1, 2):
        if "path_contains" in config:
            return nnx.PathContains(config["path_contains"], config["exact"])
        if "path_in" in config:
            return nnx.filterlib.PathIn(*(tuple(p) for p in config["path_in"]))
        if "any" in config:
            return nnx.Any(*(_decode(p) for p in config["any"]))
        if "all" in config:
            return nnx.All(*(_decode(p) for p in config["all"]))
        if "not" in config:
            return nnx.Not(_decode(config["not"]))
        if "type" in config:
            variable_type = _names.resolve(config["type"], "wrt.type")
            if not isinstance(variable_type, type):
                raise ValueError(
                    _errors.unknown_config_kind("wrt", "filter", config)
                )
            return nnx.OfType(variable_type)
        if "function" in config:
            fn = _serialization.deserialize_function(config["function"], "wrt")
            return nnx.filterlib.to_predicate(fn)
    raise ValueError(_errors.unknown_config_kind("wrt", "filter", config))


_WRT_FIX = (
    "Pass an NNX filter: a Variable type (`wrt=nnx.LoRAParam`), "
    "`nnx.PathContains('head')`, `nnx.Any(...)` / `nnx.All(...)` / "
    "`nnx.Not(...)`, a string (a tag), or a function `(path, value) -> "
    "bool`; or wrt=None to train every parameter."
)
