"""Linen modules <-> JSON-ready configs, and safe resolution of classes.

A module is saved as its class's import path and the dataclass fields that
differ from their defaults. Field values may be numbers, strings, None,
tuples, lists, dicts, dtypes, `functools.partial`, nested modules, and
functions or classes that can be imported by their path. A module class
with its own `get_config` is saved with it (and `from_config` when it has
one).

Loading resolves every name through `_names.resolve` (exact names, no
import in safe mode, an allow-list for what is called with the file's
arguments). Nothing is unpickled.
"""

import dataclasses
import enum
import functools
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
from keras_flax import _names
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


def deserialize_factory(config: Any, path: str) -> Any:
    """A function saved by `serialize_value` that loading calls with
    arguments from the file (allow-listed in safe mode)."""
    return _decode_called(config, path)


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
    cls = _module_class(config, base, api, "module")
    args = _entry(_decode(config.get("args"), "module"), "", list, "module")
    kwargs = _decode(config.get("kwargs"), "module")
    return cls, args, _entry(kwargs, "", dict, "module.kwargs")


def deserialize_nnx(config: dict[str, Any]) -> Any:
    cls = _module_class(config, nnx.Module, "flax.nnx", "module")
    return cls.from_config(_entry(config, "config", dict, "module"))


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
    if _is_namedtuple(value):
        return _record_config(value, path)
    if isinstance(value, (tuple, list)):
        items = [_encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return {
            _TAG: "tuple" if isinstance(value, tuple) else "list",
            "items": items,
        }
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _encode(v, f"{path}.{k}") for k, v in value.items()}
        return {_TAG: "dict", "items": items}
    if isinstance(value, enum.Enum):
        return {
            _TAG: "enum",
            "class": _import_path(type(value), path),
            "name": value.name,
        }
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
    if _is_dataclass(value):
        return _record_config(value, path)
    if callable(value):
        return {_TAG: "object", "path": _import_path(value, path)}
    raise UnserializableError(unserializable(path, value))


def unserializable(path: str, value: Any) -> str:
    return (
        f"`{path}` cannot be saved: it is "
        f"{value!r} ({type(value).__name__}), which has no import path. "
        "Make the value importable (a function or class defined at the top "
        "level of a module, or `functools.partial` of one). For a module "
        "field, you can instead define `get_config()` on the module class "
        "(and `from_config` if its constructor does not take that dict)."
    )


def _is_namedtuple(value: Any) -> bool:
    """A NamedTuple instance: saved as its class and fields."""
    return isinstance(value, tuple) and _fields(type(value)) is not None


def _fields(cls: type) -> tuple[str, ...] | None:
    """A NamedTuple class's field names (its documented `_fields`)."""
    return getattr(cls, "_fields", None)


def _is_dataclass(value: Any) -> bool:
    """A frozen dataclass instance, not a module: saved as its class and
    fields (a mutable one is not a configuration)."""
    return (
        dataclasses.is_dataclass(value)
        and not isinstance(value, type)
        and type(value).__dataclass_params__.frozen  # pyright: ignore
        and not _names.is_module_class(type(value))
    )


def _record_config(value: Any, path: str) -> dict[str, Any]:
    cls = type(value)
    if isinstance(value, tuple):
        names = _fields(cls) or ()
        kind, fields = "namedtuple", dict(zip(names, value, strict=True))
    else:
        kind = "dataclass"
        fields = {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if f.init
        }
    return {
        _TAG: kind,
        "class": _import_path(cls, path),
        "fields": {k: _encode(v, f"{path}.{k}") for k, v in fields.items()},
    }


def _decode_record(config: dict[str, Any], path: str) -> Any:
    """A NamedTuple or frozen dataclass from its class and fields; the
    class is resolved as a module class is, and must be of that kind."""
    kind = config[_TAG]
    cls = _names.resolve_data_class(config.get("class"), f"{path}.class", kind)
    fields = _entry(config, "fields", dict, path)
    return cls(**{k: _decode(v, f"{path}.{k}") for k, v in fields.items()})


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
        raise UnserializableError(unserializable(path, fn))
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
        raise UnserializableError(unserializable(path, obj))
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
        items = [_decode(v, path) for v in _entry(config, "items", list, path)]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        items = _entry(config, "items", dict, path)
        return {k: _decode(v, f"{path}.{k}") for k, v in items.items()}
    if kind == "dtype":
        return _dtype(_entry(config, "name", str, path), path)
    if kind == "partial":
        # Its function is called with arguments from the file.
        return functools.partial(
            _decode_called(config["func"], f"{path}.func"),
            *_entry(_decode(config.get("args"), path), "", list, path),
            **_entry(_decode(config.get("keywords"), path), "", dict, path),
        )
    if kind == "object":
        return _names.resolve(config.get("path"), path)
    if kind == "closure":
        factory = _names.resolve(config.get("factory"), path, called=True)
        kwargs = _decode(config.get("kwargs"), path)
        return factory(**_entry(kwargs, "", dict, f"{path}.kwargs"))
    if kind == "input_dim":
        return _sizes.InputDim.from_config(config, path)
    if kind == "nnx_rngs":
        # The values come from the weights file; any key builds the module.
        streams = _entry(config, "streams", list, path)
        if not all(isinstance(s, str) for s in streams):
            raise ValueError(_errors.unknown_config_kind(path, kind, config))
        return nnx.Rngs(**{stream: 0 for stream in streams})
    if kind == "prng_key":
        return jax.random.PRNGKey(0)
    if kind == "module":
        return _decode_module(config, path)
    if kind in ("namedtuple", "dataclass"):
        return _decode_record(config, path)
    if kind == "enum":
        cls = _names.resolve_data_class(config.get("class"), path, "enum")
        member = _entry(config, "name", str, path)
        if member not in cls.__members__:
            raise ValueError(
                f"The saved config entry `{path}` names the member {member!r}"
                f" of {cls.__name__}, which has none of that name. The file "
                "was altered, or saved with another version of that code."
            )
        return cls.__members__[member]
    raise ValueError(_errors.unknown_config_kind(path, kind, config))


def _decode_called(config: Any, path: str) -> Any:
    """A function the file's arguments are given to (a partial's)."""
    if isinstance(config, dict) and config.get(_TAG) == "object":
        return _names.resolve(config.get("path"), path, called=True)
    return _decode(config, path)


def _entry(config: Any, key: str, kind: type, path: str) -> Any:
    """`config[key]` (or `config` itself for key ""), of type `kind`."""
    value = config.get(key) if key and isinstance(config, dict) else config
    if not isinstance(value, kind):
        where = f"{path}.{key}" if key else path
        raise ValueError(
            f"The saved config entry `{where}` must be a {kind.__name__}. "
            f"Received: {value!r}. The file was altered or is corrupted; it "
            "was not loaded."
        )
    return value


def _dtype(name: str, path: str) -> Any:
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(
            f"The saved config entry `{path}` names the dtype {name!r}, "
            "which JAX does not know. The file was altered or is corrupted; "
            "it was not loaded."
        ) from None


def _decode_module(config: dict[str, Any], path: str) -> Any:
    cls = _module_class(config, nn.Module, "flax.linen", path)
    fields = _entry(config, "config", dict, path)
    if config.get("custom"):
        from_config = getattr(cls, "from_config", None)
        if from_config is not None:
            return from_config(fields)
        return cls(**fields)
    fields = {k: _decode(v, f"{path}.{k}") for k, v in fields.items()}
    return cls(**fields)


def _module_class(
    config: dict[str, Any], base: Any, api: str, path: str
) -> Any:
    """The module class a config names, a subclass of `base`."""
    return _names.resolve_class(config.get("class"), f"{path}.class", base, api)
