"""The messages several files give, and how messages show values.

Each message has three parts: the argument and what was expected, what was
received (`Received: arg=...`), and the fix, in code where possible. A
message given at one place lives beside the check that gives it; this file
holds those given at several, and the helpers that show what was received
(`describe`, `format_shape`).
"""

import reprlib
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

short_repr = reprlib.Repr()
short_repr.maxstring = 80
short_repr.maxother = 80


def describe(value: Any) -> str:
    """A short description of `value` for a `Received:` clause."""
    kind = type(value).__name__
    if isinstance(value, type):
        kind = "a class"
    elif callable(value) and not hasattr(value, "shape"):
        kind = "a function" if hasattr(value, "__code__") else kind
    return f"{short_repr.repr(value)} ({kind})"


def format_shape(shape: Sequence[int | None]) -> str:
    return (
        "("
        + ", ".join(str(d) for d in shape)
        + (",)" if len(shape) == 1 else ")")
    )


# Backends.


# Function signatures (JaxLayer).


# Flax modules and methods.


def bad_method_type(method: Any) -> str:
    return (
        "`method` must be None, a method name (str), a method of the module "
        "or a function whose first argument is the module. Received: "
        f"method={describe(method)}. For example: method='encode' or "
        "method=lambda module, inputs, training: module.encode(inputs)."
    )


def unknown_method(cls_name: str, name: str, available: Any) -> str:
    listed = ", ".join(f"'{n}'" for n in available) or "none"
    return (
        f"`method` names no method of {cls_name}. Received: "
        f"method={name!r}. Methods defined on the module: {listed}. Pass one "
        "of them, or a function `method(module, inputs, training)`."
    )


# Variables.


# NNX.


# Equinox.


# Build and call.


# Composition helpers.


def names(fn: Callable[..., Any]) -> str:
    import inspect

    try:
        return "(" + ", ".join(inspect.signature(fn).parameters) + ")"
    except (TypeError, ValueError):
        return "(unknown)"


def quoted(names: Any) -> str:
    return ", ".join(f"`{n}`" for n in names)


def more(items: Any, shown: Any) -> str:
    return f" (and {len(items) - shown} more)" if len(items) > shown else ""


# Packed weights.


# Saving and loading configs.


def unknown_config_kind(path: str, kind: Any, config: dict[str, Any]) -> str:
    return (
        f"The saved config of `{path}` has an entry of unknown kind "
        f"{kind!r}. Received: {config!r}. The file was saved by another "
        "version of keras-flax, or altered; load it with the version that "
        "saved it."
    )


# OptaxOptimizer.


# Fine-tuning: `wrt` and assigned variables.


# Safetensors checkpoints.


# Distribution.


# Quantization.
