"""Names a saved file gives, resolved to objects: the one resolver.

Every class or function a config names (linen fields, recorded constructor
calls, methods, activations, initializers, Optax factories, `wrt` filters,
Equinox fields, `JaxLayer` functions) is written `module:qualname` and
comes back through `resolve`, under one rule:

- **Exact.** The object is read from the named module's own namespace and,
  for a dotted qualname, through classes only: never through a module
  attribute into another module, never through a module's `__getattr__`
  (which may import). It must carry that same `__qualname__`, and its own
  `__module__` must belong to the named module's package (a public module
  re-exporting its package's object, `jax.nn:gelu`, resolves; a module's
  import of another package's object, `keras_flax._safetensors:os`, does
  not).
- **Imported.** In safe mode (Keras' default) the module must already be
  imported and not be the standard library's; loading imports nothing.
  With `safe_mode=False` the module is imported.
- **Named only if usable.** In safe mode, a function or class the model
  calls (an activation, a method, `JaxLayer`'s functions) must be a public
  one of the libraries models are written with (`USABLE`), or the user's
  own code: a module imported from outside the environment's
  site-packages.
- **Called only if allowed.** What loading *calls* with arguments from the
  file (an initializer factory, a `functools.partial`'s function, an Optax
  factory, a module class's constructor) must, in safe mode, be on the
  allow-list: JAX's and Flax's initializers and JAX's activations, Optax's
  transformations and schedules, linen/NNX/Equinox module classes, and
  objects registered with Keras or passed in `custom_objects`.

A name that breaks a rule is refused before anything is called, naming the
config entry, the name and the fix.
"""

import dataclasses
import enum
import functools
import importlib
import os
import re
import site
import sys
import sysconfig
import types
from typing import Any

import keras

from keras_flax import _private

# Modules whose functions a file may call in safe mode (and Optax's public
# modules).
_CALL_MODULES = frozenset(
    {
        "jax.nn",
        "jax.nn.initializers",
        "flax.linen.initializers",
        "flax.nnx.nn.initializers",
    }
)

_DOTTED = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
_NAME = re.compile(f"{_DOTTED}:{_DOTTED}")

ALLOW_LIST = (
    "JAX's and Flax's initializers (jax.nn.initializers, "
    "flax.linen.initializers, flax.nnx.initializers), JAX's activations "
    "(jax.nn), Optax's transformations and schedules (optax), linen, NNX "
    "and Equinox module classes, and objects registered with Keras "
    "(`keras.saving.register_keras_serializable`) or passed in "
    "`custom_objects`"
)


# Modules whose public functions and classes a file may name (a module's
# activation, an Equinox field): what models are written with.
_VALUE_MODULES = frozenset(
    {
        *_CALL_MODULES,
        "jax.numpy",
        "jax.lax",
        "jax.random",
        "jax.scipy.special",
        "flax.linen",
        "flax.nnx",
        "equinox.nn",
        "keras.activations",
        "keras.ops",
    }
)

USABLE = (
    "what it may call, the public functions and classes of jax.nn, "
    "jax.numpy, jax.lax, jax.random, jax.scipy.special, flax.linen, "
    "flax.nnx, equinox.nn, keras.activations and keras.ops, and your own "
    "code (a module imported from outside the environment's site-packages)"
)


class RefusedName(ValueError):
    """A name in a saved file that loading does not resolve or call."""


def resolve_class(name: Any, entry: str, base: type, api: str) -> type:
    """The module class `name` names: a subclass of `base` (whose
    constructor loading calls), else refused naming `api`."""
    cls = _resolve(name, entry, check=False)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RefusedName(
            f"The saved layer config names {name} as its module class, which "
            f"is not a {api}.Module class. The file may be corrupted or "
            "crafted; it was not loaded."
        )
    return cls


def resolve_data_class(name: Any, entry: str, kind: str) -> type:
    """The class of a saved value of `kind`, resolved as a module class
    is (exact, imported), and of that kind: `"namedtuple"` (a NamedTuple
    class: its generated constructor), `"dataclass"` (a frozen dataclass)
    or `"enum"` (an `enum.Enum`: a member is looked up, nothing called)."""
    cls = _resolve(name, entry, check=False)
    fits = isinstance(cls, type) and (
        (issubclass(cls, tuple) and getattr(cls, "_fields", None) is not None)
        if kind == "namedtuple"
        else issubclass(cls, enum.Enum)
        if kind == "enum"
        else dataclasses.is_dataclass(cls)
        and cls.__dataclass_params__.frozen  # pyright: ignore
        and not is_module_class(cls)
    )
    if not fits:
        what = {"dataclass": "frozen dataclass"}.get(kind, kind)
        raise RefusedName(
            f"The saved config entry `{entry}` names {name} as a {what} "
            "class, which it is not. The file was altered or is corrupted; "
            "it was not loaded."
        )
    return cls


def resolve(name: Any, entry: str, *, called: bool = False) -> Any:
    """The object `name` (`module:qualname`) names, under the rule above.

    Args:
        name: the name as the file gives it.
        entry: where in the config it stands (for the message).
        called: whether loading calls it with arguments from the file.
    """
    return _resolve(name, entry, check=True, called=called)


def _resolve(name: Any, entry: str, check: bool, called: bool = False) -> Any:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RefusedName(
            f"The saved config entry `{entry}` must name a class or function "
            f"as 'module:qualname'. Received: {name!r}. The file was altered "
            "or is corrupted; it was not loaded."
        )
    registered = _registered(name)
    if registered is not None:
        return registered
    module_name, _, qualname = name.partition(":")
    safe = _private.in_safe_mode()
    if safe and _in_stdlib(module_name):
        raise RefusedName(_refused(entry, name, "is in the standard library"))
    module = sys.modules.get(module_name)
    if module is None:
        if safe:
            raise RefusedName(
                _refused(entry, name, "is not imported", module_name)
            )
        module = importlib.import_module(module_name)
    obj = _exact(module, qualname)
    if obj is None:
        raise RefusedName(
            f"The saved config entry `{entry}` names {name}, which module "
            f"{module_name} does not define as its own class or function "
            "(loading reads names exactly and never follows an attribute "
            "into another module). Check that the code that defines it is "
            "the same as when the model was saved; a crafted file is "
            "refused this way."
        )
    if safe and check and called and not _callable(obj):
        raise RefusedName(
            f"The saved config entry `{entry}` asks to call {name} with "
            "arguments from the file, and safe mode calls only "
            f"{ALLOW_LIST}. {_fixes(name)}"
        )
    if safe and check and not called and not _usable(obj):
        raise RefusedName(
            f"The saved config entry `{entry}` names {name}, a function or "
            f"class of the installed library {obj.__module__.split('.')[0]},"
            f" and safe mode loads only {USABLE}. {_fixes(name)}"
        )
    return obj


def _fixes(name: str) -> str:
    return (
        "If you trust this file, pass `safe_mode=False` to "
        "`keras.saving.load_model`, or register the object with "
        "`keras.saving.register_keras_serializable` (or pass it in "
        f"`custom_objects={{{name!r}: ...}}`)."
    )


def _registered(name: str) -> Any:
    """The object registered with Keras (or in `custom_objects`) as
    `name`, or None."""
    return keras.saving.get_registered_object(name)


def _in_stdlib(module_name: str) -> bool:
    top = module_name.split(".")[0]
    return top in sys.stdlib_module_names or top == "builtins"


def _exact(module: types.ModuleType, qualname: str) -> Any:
    """The object at `qualname` in `module`'s own namespace, through
    classes only, carrying that qualname and a module of the package;
    None otherwise."""
    first, *rest = qualname.split(".")
    obj = vars(module).get(first)
    for part in rest:
        if not isinstance(obj, type):
            return None
        owner, obj = obj, vars(obj).get(part)
        if isinstance(obj, staticmethod):
            obj = obj.__func__
        elif isinstance(obj, classmethod):
            obj = getattr(owner, part)
    if obj is None or isinstance(obj, types.ModuleType):
        return None
    own_module = getattr(obj, "__module__", None)
    if getattr(obj, "__qualname__", None) != qualname or not isinstance(
        own_module, str
    ):
        return None
    package = module.__name__.split(".")[0]
    if own_module.split(".")[0] != package or _in_stdlib(own_module):
        return None
    return obj


def _callable(obj: Any) -> bool:
    """Whether safe mode lets loading call `obj` with the file's
    arguments."""
    if isinstance(obj, type) and is_module_class(obj):
        return True
    return _is_registered(obj) or _public_in(obj, _CALL_MODULES, "optax")


def _usable(obj: Any) -> bool:
    """Whether safe mode lets a file name `obj` (called by the model with
    its own arguments: an activation, a method, `JaxLayer`'s functions)."""
    if _callable(obj) or _public_in(obj, _VALUE_MODULES, "optax"):
        return True
    return _is_user_code(obj.__module__)


def _public_in(obj: Any, modules: frozenset[str], package: str) -> bool:
    """Whether `obj` is what one of `modules`, or a public module of
    `package`, holds under its name (whichever name the file used)."""
    name = getattr(obj, "__name__", "_")
    own = obj.__module__.split(".")[0]
    if name.startswith("_"):
        return False
    for module_name, module in list(sys.modules.items()):
        parts = module_name.split(".")
        listed = module_name in modules or (
            parts[0] == package and not any(p.startswith("_") for p in parts)
        )
        # Defined by that library (`jax.numpy:save` is NumPy's).
        if listed and own == parts[0] and vars(module).get(name) is obj:
            return True
    return False


def _is_user_code(module_name: str) -> bool:
    """A module of the user's own: imported from outside the directories
    where installed packages live (an interactive `__main__` too)."""
    if module_name.split(".")[0] == "keras_flax":
        return False
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if file is None:
        return module_name == "__main__"
    path = os.path.realpath(file)
    return not any(path.startswith(folder) for folder in _library_folders())


@functools.cache
def _library_folders() -> tuple[str, ...]:
    """Where the environment's installed packages (and the standard
    library) live."""
    folders = {*site.getsitepackages(), site.getusersitepackages()}
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        folders.add(sysconfig.get_paths()[key])
    return tuple(os.path.join(os.path.realpath(f), "") for f in folders)


def is_module_class(cls: type) -> bool:
    """A linen, NNX or Equinox module class (Equinox only when imported)."""
    import flax.linen as nn
    from flax import nnx

    bases: list[type] = [nn.Module, nnx.Module]
    equinox = sys.modules.get("equinox")
    if equinox is not None:
        bases.append(equinox.Module)
    return issubclass(cls, tuple(bases))


def _is_registered(obj: Any) -> bool:
    """Whether `obj` is registered with Keras, or in `custom_objects`
    under its own name."""
    for name in (keras.saving.get_registered_name(obj), obj.__qualname__):
        if _registered(name) is obj:
            return True
    return False


def _refused(entry: str, name: str, why: str, module_name: str = "") -> str:
    module_name = module_name or name.partition(":")[0]
    fix = (
        f"import {module_name} before loading, or pass `safe_mode=False`"
        if why == "is not imported"
        else "pass `safe_mode=False`"
    )
    return (
        f"Loading refused to resolve {name}: the module {module_name} {why}, "
        "and safe mode resolves classes and functions only from packages "
        f"already imported or registered with Keras (config entry `{entry}`)."
        f" If you trust this file, {fix} to `keras.saving.load_model`."
    )
