"""The registry of kinds of models.

A kind is one `Kind` entry: how to recognise its objects, the layer class
that wraps them, its adapter (a function returning a `Model`, see
`_model`) and how to rebuild its object from a saved config. The layer
classes find the kind of what they are given here (`of`), and their
`from_config` the object a config names (`rebuilt`); nothing else asks
which kind a layer holds. A new kind is one adapter and one `register`
call.

The adapters of a layer class take the same arguments, each refusing
those it has no use for: `FlaxLayer`'s take `(module, method,
takes_training, *, variables, rng_collections, seed)`; `JaxLayer`'s
`(call_fn, call_arguments, init_fn, init_arguments, params, state)`;
`EquinoxLayer`'s `(module, method, *, state, batched)`. A module built
from a recorded constructor call (`from_nnx`, `from_constructor`, a saved
config) is given as a `Call`, which its kind recognises too. Equinox is
optional: its adapter is imported when an Equinox module is wrapped.
"""

import dataclasses
import sys
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx

from keras_flax import _errors
from keras_flax import _functions
from keras_flax import _linen
from keras_flax import _nnx
from keras_flax import _serialization
from keras_flax import _sizes
from keras_flax._model import Call
from keras_flax._model import Model


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kind:
    """A kind of model.

    Attributes:
        name: the kind's name (`"linen"`).
        layer: the name of the layer class wrapping it (`"FlaxLayer"`).
        label: what messages call its objects (`"a Flax linen module"`),
            telling a user given the wrong layer which one to use.
        recognises: `object -> bool`: whether an object (or a `Call`) is
            of this kind.
        adapt: the adapter, `(object, ...) -> Model`.
        rebuild: `module config -> object or None`: the object a saved
            config (`Model.config()["module"]`) describes, given to the
            layer as a user gives one; None for another kind's config.
            None for a kind that saves no module.
        module_type: the base class of the modules it accepts, whose own
            methods (those the base lacks) a layer may call; None for a
            kind without methods.
    """

    name: str
    layer: str
    label: str
    recognises: Callable[[Any], bool]
    adapt: Callable[..., Model]
    rebuild: Callable[[dict[str, Any]], Any] | None = None
    module_type: type | None = None


KINDS: list[Kind] = []


def register(kind: Kind) -> None:
    """Adds `kind` to the registry (a kind of the same name is replaced);
    the first kind of a layer recognising an object wraps it."""
    KINDS[:] = [known for known in KINDS if known.name != kind.name]
    KINDS.append(kind)


def of(obj: Any, layer: str, refused: Callable[[Any], str]) -> Kind:
    """The kind of `obj` among those `layer` wraps.

    Raises:
        TypeError: for an object another layer wraps, naming that layer;
            else with the message `refused(obj)`.
    """
    for kind in KINDS:
        if kind.layer == layer and kind.recognises(obj):
            return kind
    for other in KINDS:
        if other.layer not in (layer, "JaxLayer") and other.recognises(obj):
            raise TypeError(
                f"`module` of {layer} must be a module {layer} wraps. "
                f"Received: module={type(obj).__name__}(...), {other.label},"
                f" which {other.layer} wraps. Fix: `{other.layer}(module)`."
            )
    raise TypeError(refused(obj))


def rebuilt(config: dict[str, Any], layer: str) -> Any:
    """The object the saved module `config` of a `layer` describes.

    Raises:
        ValueError: no kind of `layer` reads it.
    """
    for kind in KINDS:
        if kind.layer == layer and kind.rebuild is not None:
            obj = kind.rebuild(config)
            if obj is not None:
                return obj
    raise ValueError(
        f"The saved config of a {layer} describes no module it wraps. "
        f"Received: module={config!r}. The file was altered or is "
        "corrupted; it was not loaded."
    )


def owner(obj: Any) -> Any:
    """The module or class on which the methods of `obj` are looked up."""
    return obj.module_class if isinstance(obj, Call) else obj


def instance_or_call(base: type) -> Callable[[Any], bool]:
    """Recognises instances of `base`, and calls constructing one."""

    def recognises(obj: Any) -> bool:
        if isinstance(obj, Call):
            cls = obj.module_class
            return isinstance(cls, type) and issubclass(cls, base)
        return isinstance(obj, base)

    return recognises


def not_a_flax_module(module: Any) -> str:
    if isinstance(module, type) and issubclass(module, nnx.Module):
        fix = (
            "To wrap an NNX Module class, instantiate it: "
            f"FlaxLayer({module.__name__}(..., rngs=nnx.Rngs(0)))."
        )
    elif isinstance(module, type):
        fix = (
            "To wrap a Module class, instantiate it: "
            f"FlaxLayer({module.__name__}(...))."
        )
    elif callable(module):
        fix = (
            "To wrap a JAX function use keras_flax.JaxLayer(call_fn=...); "
            "to wrap a Module, pass an instance: FlaxLayer(MyModule())."
        )
    else:
        fix = "Pass a Module instance: FlaxLayer(MyModule())."
    return (
        "`module` must be a flax.linen.Module or flax.nnx.Module instance. "
        f"Received: module={_errors.describe(module)}. {fix}"
    )


def _nnx_call(config: dict[str, Any]) -> Call | None:
    call = _serialization.nnx_call(config)
    return None if call is None else Call(call[0], tuple(call[1]), call[2])


def _is_nnx(obj: Any) -> bool:
    return instance_or_call(nnx.Module)(obj) and not _is_sized(obj)


def _is_sized(obj: Any) -> bool:
    return isinstance(obj, Call) and bool(_sizes.find(obj.args, obj.kwargs))


def _is_equinox(obj: Any) -> bool:
    # An Equinox module exists only where equinox was imported.
    equinox = sys.modules.get("equinox")
    return equinox is not None and instance_or_call(equinox.Module)(obj)


def _equinox() -> types.ModuleType:
    """The Equinox adapter, which imports equinox; refused without it."""
    try:
        from keras_flax import _equinox
    except ImportError as error:
        raise ImportError(equinox_missing(error)) from error
    return _equinox


def equinox_missing(error: BaseException) -> str:
    return (
        "`EquinoxLayer` needs the `equinox` package (the `equinox` extra). "
        f"Received: `import equinox` failed ({error}). Fix: "
        '`pip install "keras-flax[equinox]"` (or `pip install equinox`).'
    )


def _adapt_equinox(*args: Any, **kwargs: Any) -> Model:
    return _equinox().adapt(*args, **kwargs)


def _rebuild_equinox(config: dict[str, Any]) -> Call | None:
    call = _equinox().constructor_call(config)
    return None if call is None else Call(call[0], tuple(call[1]), call[2])


register(
    Kind(
        name="functions",
        layer="JaxLayer",
        label="JAX functions",
        recognises=callable,
        adapt=_functions.adapt,
    )
)
register(
    Kind(
        name="nnx",
        layer="FlaxLayer",
        label="a Flax NNX module",
        recognises=_is_nnx,
        adapt=_nnx.adapt,
        rebuild=_nnx_call,
        module_type=nnx.Module,
    )
)
register(
    Kind(
        name="nnx-sized",
        layer="FlaxLayer",
        label="a Flax NNX module",
        recognises=_is_sized,
        adapt=_nnx.adapt_sized,
        module_type=nnx.Module,
    )
)
register(
    Kind(
        name="linen",
        layer="FlaxLayer",
        label="a Flax linen module",
        recognises=lambda obj: isinstance(obj, nn.Module),
        adapt=_linen.adapt,
        # Tried last: it reads any module config (NNX's own included).
        rebuild=_serialization.deserialize_module,
        module_type=nn.Module,
    )
)
register(
    Kind(
        name="equinox",
        layer="EquinoxLayer",
        label="an Equinox module",
        recognises=_is_equinox,
        adapt=_adapt_equinox,
        rebuild=_rebuild_equinox,
    )
)
