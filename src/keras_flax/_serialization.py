"""Linen modules <-> JSON-ready configs, and safe resolution of classes.

A module is saved as its class's import path and the dataclass fields that
differ from their defaults. Field values may be numbers, strings, None,
tuples, lists, dicts, dtypes, `functools.partial`, nested modules, and
functions or classes that can be imported by their path. A module class
with its own `get_config` is saved with it (and `from_config` when it has
one).

Loading resolves a class or function only from a Python module that is
already imported in the loading process (the standard library excepted)
or registered with `keras.saving.register_keras_serializable`; with Keras'
safe mode off (`safe_mode=False`), it may import the module. Nothing is
unpickled.
"""

import dataclasses
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
from flax import nnx

from keras_flax import _errors
from keras_flax import _private
from keras_flax import _sizes

_TAG = "__keras_flax__"
_SIMPLE = (type(None), bool, int, float, str)


class UnserializableError(TypeError):
    pass


def serialize_module(module: Any) -> dict[str, Any]:
    """A JSON-ready config of a linen module instance."""
    return _module_config(module, "module")


def deserialize_module(config: dict[str, Any]) -> Any:
    """A linen or NNX module (from its own config) from a saved config."""
    if config.get(_TAG) == "nnx_config":
        return deserialize_nnx(config)
    return _decode(config, "module")


@dataclasses.dataclass(frozen=True)
class RecordedCall:
    """The constructor arguments of a module (NNX, Equinox)."""

    args: tuple
    kwargs: dict


def serialize_method(cls: type, method: Any) -> Any:
    """The config of `method` of a module of class `cls`."""
    if method is None or isinstance(method, str):
        return method
    func = getattr(method, "__func__", None)
    if func is not None and getattr(cls, method.__name__, None) is func:
        return method.__name__  # a method of the module's class, by name
    return _encode(method, "method")


def deserialize_method(config: dict[str, Any]) -> Any:
    if config is None or isinstance(config, str):
        return config
    return _decode(config, "method")


def serialize_function(fn: Callable[..., Any] | None, arg: str) -> Any:
    """A JSON-ready config of a function: Keras-registered, or by path."""
    if fn is None:
        return None
    name = keras.saving.get_registered_name(fn)
    if name != getattr(fn, "__name__", name):
        return keras.saving.serialize_keras_object(fn)
    return _encode(fn, arg)


def deserialize_function(config: dict[str, Any], arg: str) -> Any:
    if isinstance(config, dict) and _TAG in config:
        return _decode(config, arg)
    return keras.saving.deserialize_keras_object(config)


def import_path(obj: Any, path: str) -> str:
    """`module:qualname` of a class or function; `resolve` finds it."""
    return _import_path(obj, path)


def serialize_value(value: Any, path: str) -> Any:
    """A JSON-ready config of `value`: what a module field may hold
    (numbers, strings, containers, functions by import path, ...)."""
    return _encode(value, path)


def deserialize_value(config: dict[str, Any], path: str) -> Any:
    return _decode(config, path)


def serialize_nnx(module: Any, recorded_call: Any) -> dict[str, Any]:
    """The config of an NNX module.

    Its recorded constructor call when there is one, else its class's own
    `get_config()`.
    """
    if recorded_call is not None:
        return serialize_call(type(module), recorded_call, "nnx_call")
    return {
        _TAG: "nnx_config",
        "class": _import_path(type(module), "module"),
        "config": module.get_config(),
    }


def serialize_call(cls: type, recorded_call: Any, tag: str) -> dict[str, Any]:
    """The config of a recorded constructor call `cls(*args, **kwargs)`,
    tagged `tag` (which `recorded_call` reads back)."""
    return {
        _TAG: tag,
        "class": _import_path(cls, "module"),
        "args": _encode(list(recorded_call.args), "module.<args>"),
        "kwargs": _encode(dict(recorded_call.kwargs), "module.<kwargs>"),
    }


def recorded_call(config: dict[str, Any], tag: str, base: Any, api: str) -> Any:
    """`(class, args, kwargs)` of a call saved by `serialize_call` with
    `tag`, whose class must be a subclass of `base` (`api` names it in the
    message); None for another config."""
    if config.get(_TAG) != tag:
        return None
    cls = resolve(config["class"])
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(_errors.not_a_module_class(config["class"], api))
    args = _decode(config["args"], "module")
    return cls, args, _decode(config["kwargs"], "module")


def _nnx_class(config: dict[str, Any]) -> Any:
    cls = resolve(config["class"])
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
        raise ValueError(
            _errors.not_a_module_class(config["class"], "flax.nnx")
        )
    return cls


def deserialize_nnx(config: dict[str, Any]) -> Any:
    return _nnx_class(config).from_config(config["config"])


def nnx_call(config: dict[str, Any]) -> Any:
    """`(class, args, kwargs)` of a recorded NNX constructor call, or None."""
    return recorded_call(config, "nnx_call", nnx.Module, "flax.nnx")


def _module_config(module: Any, path: str) -> dict[str, Any]:
    cls = type(module)
    if hasattr(module, "get_config"):
        return {
            _TAG: "module",
            "class": _import_path(cls, path),
            "config": module.get_config(),
            "custom": True,
        }
    fields = {}
    for field in dataclasses.fields(module):
        if field.name == "parent" or not field.init:
            continue
        value = getattr(module, field.name)
        if _is_default(value, field):
            continue
        fields[field.name] = _encode(value, f"{path}.{field.name}")
    return {_TAG: "module", "class": _import_path(cls, path), "config": fields}


def _is_default(value: Any, field: Any) -> Any:
    default = field.default
    if default is dataclasses.MISSING:
        if field.default_factory is dataclasses.MISSING:
            return False
        default = field.default_factory()
    if value is default:
        return True
    return (
        isinstance(value, _SIMPLE)
        and type(value) is type(default)
        and (value == default)
    )


def _encode(value: Any, path: str) -> Any:
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, nn.Module):
        return _module_config(value, path)
    if isinstance(value, (tuple, list)):
        items = [_encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return {_TAG: type(value).__name__, "items": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _encode(v, f"{path}.{k}") for k, v in value.items()}
        return {_TAG: "dict", "items": items}
    if _is_dtype(value):
        dtype: Any = value
        return {_TAG: "dtype", "name": np.dtype(dtype).name}
    if isinstance(value, functools.partial):
        return {
            _TAG: "partial",
            "func": _encode(value.func, f"{path}.func"),
            "args": _encode(list(value.args), f"{path}.args"),
            "keywords": _encode(dict(value.keywords), f"{path}.keywords"),
        }
    if isinstance(value, _sizes.InputDim):
        return {_TAG: "input_dim", "axis": value.axis}
    if isinstance(value, nnx.Rngs):
        return {_TAG: "nnx_rngs", "streams": sorted(_rng_streams(value))}
    if _is_key(value):
        # An Equinox constructor's `key`: the values come from the file.
        return {_TAG: "prng_key"}
    if _is_factory_closure(value):
        return _closure_config(value, path)
    if callable(value):
        return {_TAG: "object", "path": _import_path(value, path)}
    raise UnserializableError(_errors.unserializable(path, value))


def _is_key(value: Any) -> Any:
    """A JAX PRNG key: typed, or raw (`uint32[2]`, `jax.random.PRNGKey`)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or not isinstance(value, jax.Array):
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and tuple(value.shape) == (2,)


def _rng_streams(rngs: Any) -> set[Any]:
    return {
        node.tag
        for _, node in nnx.iter_graph(rngs)
        if isinstance(node, nnx.RngStream)
    }


def _is_factory_closure(fn: Any) -> Any:
    """A function made by a factory, `factory.<locals>.inner`."""
    qualname = getattr(fn, "__qualname__", "")
    return (
        getattr(fn, "__closure__", None) is not None
        and qualname.count(".<locals>.") == 1
        and not qualname.startswith("<")
    )


def _closure_config(fn: Any, path: str) -> dict[str, Any]:
    """`factory(**captured)` for a closure such as `normal(0.02)`.

    Saved when the factory can be imported and every variable the closure
    captures is a parameter of the factory, as for JAX's and Flax's
    initializers (`variance_scaling(...)`, `normal(stddev)`, ...).
    """
    factory_name = fn.__qualname__.split(".<locals>.")[0]
    factory = _lookup(fn.__module__, factory_name)
    captured = dict(
        zip(
            fn.__code__.co_freevars,
            (cell.cell_contents for cell in fn.__closure__),
            strict=True,
        )
    )
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    if factory is None or not set(captured) <= set(parameters):
        raise UnserializableError(_errors.unserializable(path, fn))
    return {
        _TAG: "closure",
        "factory": _import_path(factory, path),
        "kwargs": _encode(captured, f"{path}.<captured>"),
    }


def _is_dtype(value: Any) -> bool:
    if isinstance(value, np.dtype):
        return True
    if not isinstance(value, type) or issubclass(value, nn.Module):
        return False
    try:
        return jnp.dtype(value) is not None
    except (TypeError, ValueError):
        return False


def _import_path(obj: Any, path: str) -> str:
    """`module:qualname` of `obj`, by a public module where one has it
    (`jax.nn:gelu`, not the private module defining `gelu`)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if (
        module is None
        or qualname is None
        or "<" in qualname
        or _lookup(module, qualname) is not obj
    ):
        raise UnserializableError(_errors.unserializable(path, obj))
    return f"{_public_module(obj, module, qualname)}:{qualname}"


def _is_public(module_name: str) -> bool:
    return not any(part.startswith("_") for part in module_name.split("."))


def _public_module(obj: Any, module: Any, qualname: str) -> Any:
    """The shortest public module of `module`'s package holding `obj` at
    `qualname`, or `module` itself."""
    if _is_public(module):
        return module
    top = module.split(".")[0]
    candidates = sorted(
        (
            name
            for name in list(sys.modules)
            if (name == top or name.startswith(top + ".")) and _is_public(name)
        ),
        key=lambda name: (name.count("."), name),
    )
    for name in candidates:
        if _lookup(name, qualname) is obj:
            return name
    return module


def _lookup(module_name: str, qualname: str) -> Any:
    obj = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _decode(config: Any, path: str) -> Any:
    if isinstance(config, list):
        return [_decode(v, path) for v in config]
    if not isinstance(config, dict) or _TAG not in config:
        return config
    kind = config[_TAG]
    if kind in ("tuple", "list"):
        items = [_decode(v, path) for v in config["items"]]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode(v, path) for k, v in config["items"].items()}
    if kind == "dtype":
        return jnp.dtype(config["name"])
    if kind == "partial":
        return functools.partial(
            _decode(config["func"], path),
            *_decode(config["args"], path),
            **_decode(config["keywords"], path),
        )
    if kind == "object":
        return resolve(config["path"])
    if kind == "closure":
        factory = resolve(config["factory"], call=True)
        return factory(**_decode(config["kwargs"], path))
    if kind == "input_dim":
        return _sizes.InputDim(config["axis"])
    if kind == "nnx_rngs":
        # The values come from the weights file; any key builds the module.
        return nnx.Rngs(**{stream: 0 for stream in config["streams"]})
    if kind == "prng_key":
        return jax.random.PRNGKey(0)
    if kind == "module":
        return _decode_module(config, path)
    raise ValueError(_errors.unknown_config_kind(path, kind, config))


def _decode_module(config: dict[str, Any], path: str) -> Any:
    cls = resolve(config["class"])
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(
            _errors.not_a_module_class(config["class"], "flax.linen")
        )
    if config.get("custom"):
        from_config = getattr(cls, "from_config", None)
        if from_config is not None:
            return from_config(config["config"])
        return cls(**config["config"])
    fields = {k: _decode(v, f"{path}.{k}") for k, v in config["config"].items()}
    return cls(**fields)


# Modules whose factories a file may call in safe mode: initializers.
_CALLABLE_FACTORIES = (
    *_private.SAVED_FACTORY_MODULES,
    "jax.nn.initializers",
    "flax.linen.initializers",
    "flax.nnx.initializers",
)


def resolve(import_path: str, call: Any = False) -> Any:
    """The object at `module:qualname`, resolved safely.

    In safe mode, the module must already be imported (the standard library
    excepted), or the object registered with Keras; a factory that loading
    calls (`call=True`) must be one of JAX's or Flax's initializers, or
    registered.
    """
    registered = keras.saving.get_registered_object(import_path)
    if registered is not None:
        return registered
    module_name, _, qualname = import_path.partition(":")
    top = module_name.split(".")[0]
    safe = _private.in_safe_mode()
    if safe and (top in sys.stdlib_module_names or top == "builtins"):
        raise ValueError(
            _errors.load_refused(import_path, "is in the standard library")
        )
    if safe and call and module_name not in _CALLABLE_FACTORIES:
        raise ValueError(
            _errors.load_refused(
                import_path, "is not a JAX or Flax initializer module"
            )
        )
    if module_name not in sys.modules:
        if safe:
            raise ValueError(
                _errors.load_refused(import_path, "is not imported")
            )
        importlib.import_module(module_name)
    obj = _lookup(module_name, qualname)
    if obj is None:
        raise ValueError(_errors.not_found(qualname, module_name, import_path))
    return obj
