"""The registry of kinds of models.

A kind is one `Kind` entry: the objects it accepts, the layer class that
wraps them, and its adapter (a function returning a `Model`, see
`_model`). A layer finds the kind of what it is given here, and nowhere
else asks which kind it holds; a new kind is one adapter file and one
entry of `KINDS`.

The adapters of a layer class take the same arguments, each refusing
those it has no use for: `FlaxLayer`'s take `(module, method,
takes_training, *, variables, rng_collections, seed)`; `JaxLayer`'s
`(call_fn, call_arguments, init_fn, init_arguments, params, state)`;
`EquinoxLayer`'s `(module, method, *, state, batched)`. Equinox is
optional: its adapter is imported when an Equinox module is wrapped.
"""

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx

from keras_flax import _errors
from keras_flax import _functions
from keras_flax import _linen
from keras_flax import _nnx
from keras_flax import _sizes
from keras_flax._model import Model


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kind:
    """A kind of model.

    Attributes:
        name: the kind's name (`"linen"`).
        layer: the name of the layer class wrapping it (`"FlaxLayer"`).
        accepts: `object -> bool`: whether an object is of this kind.
        adapt: the adapter, `(object, ...) -> Model`.
        module_type: the base class of the modules it accepts, whose own
            methods (those the base lacks) a layer may call; None for a
            kind without methods.
        owner: `object -> module or class` on which its methods are
            looked up.
    """

    name: str
    layer: str
    accepts: Callable[[Any], bool]
    adapt: Callable[..., Model]
    module_type: type | None = None
    owner: Callable[[Any], Any] = lambda obj: obj


def _instance_of(cls: type) -> Callable[[Any], bool]:
    return lambda obj: isinstance(obj, cls)


def _is_equinox_module(obj: Any) -> bool:
    # An Equinox module exists only where equinox was imported.
    equinox = sys.modules.get("equinox")
    return equinox is not None and isinstance(obj, equinox.Module)


def _adapt_equinox(*args: Any, **kwargs: Any) -> Model:
    from keras_flax import _equinox

    return _equinox.adapt(*args, **kwargs)


KINDS = (
    Kind(
        name="functions",
        layer="JaxLayer",
        accepts=callable,
        adapt=_functions.adapt,
    ),
    Kind(
        name="linen",
        layer="FlaxLayer",
        accepts=_instance_of(nn.Module),
        adapt=_linen.adapt,
        module_type=nn.Module,
    ),
    Kind(
        name="nnx",
        layer="FlaxLayer",
        accepts=_instance_of(nnx.Module),
        adapt=_nnx.adapt,
        module_type=nnx.Module,
    ),
    Kind(
        name="nnx-sized",
        layer="FlaxLayer",
        accepts=_instance_of(_sizes.SizedCall),
        adapt=_nnx.adapt_sized,
        module_type=nnx.Module,
        owner=lambda sized: sized.module_class,
    ),
    Kind(
        name="equinox",
        layer="EquinoxLayer",
        accepts=_is_equinox_module,
        adapt=_adapt_equinox,
    ),
)


_LABELS = {
    "linen": "a Flax linen",
    "nnx": "a Flax NNX",
    "nnx-sized": "a Flax NNX",
    "equinox": "an Equinox",
}


def of(obj: Any, layer: str) -> Kind:
    """The kind of `obj` among those `layer` wraps; refuses anything else.

    Raises:
        TypeError: naming what `layer` takes.
    """
    for kind in KINDS:
        if kind.layer == layer and kind.accepts(obj):
            return kind
    other = next(
        (
            kind
            for kind in KINDS
            if kind.layer not in (layer, "JaxLayer") and kind.accepts(obj)
        ),
        None,
    )
    if other is not None:
        raise TypeError(
            f"`module` of {layer} must be a module {layer} wraps. Received: "
            f"module={type(obj).__name__}(...), {_LABELS[other.name]} "
            f"module, which {other.layer} wraps. Fix: "
            f"`{other.layer}(module)`."
        )
    if layer == "EquinoxLayer":
        raise TypeError(_errors.not_an_equinox_module(obj))
    raise TypeError(_errors.not_a_module(obj))


def of_layer(layer: str) -> tuple[Kind, ...]:
    """The kinds `layer` wraps."""
    return tuple(kind for kind in KINDS if kind.layer == layer)
