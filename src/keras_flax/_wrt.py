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
        raise TypeError(_errors.wrt_unsupported(wrt, label))
    if not _is_filter(wrt):
        raise TypeError(_errors.wrt_not_a_filter(wrt))
    found = nnx.filterlib.to_predicate(wrt)
    for part in _parts(found):
        if not isinstance(part, _FILTERS) and not _takes_path_and_value(part):
            raise TypeError(_errors.wrt_bad_function(wrt, part))
    if not fine_tuning.variable_filters:
        typed = [p for p in _parts(found) if isinstance(p, _VARIABLE_FILTERS)]
        if typed:
            raise TypeError(_errors.wrt_typed_for_linen(wrt, typed))
    return found


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
        raise ValueError(_errors.wrt_selects_nothing(wrt, label, paths))
    return out


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
        raise TypeError(_errors.wrt_not_serializable(wrt, part)) from error


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
