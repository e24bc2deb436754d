"""Sizes left to the input: `FlaxLayer.input_dim()` in `from_nnx`.

`FlaxLayer.from_nnx(nnx.Linear, FlaxLayer.input_dim(), 10, rngs=...)`
records the constructor call with a placeholder where the input's size
goes; the module is constructed when the layer is built, with the
placeholder replaced by that dimension of the input, as
`keras.layers.Dense(10)` learns its input size. The recorded call (the
placeholder included) is the layer's config, so `load_model` rebuilds it
for the saved input shape.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from keras_flax import _inputs


@dataclasses.dataclass(frozen=True)
class InputDim:
    """A constructor argument taking the size of the input's `axis`.

    Attributes:
        axis: the input's axis (negative counts from the last); not the
            batch axis, whose size is not known at build.
    """

    axis: int = -1

    def __post_init__(self) -> None:
        axis = self.axis
        if isinstance(axis, bool) or not isinstance(axis, int) or axis == 0:
            raise ValueError(input_dim_axis(axis))

    @classmethod
    def from_config(cls, config: dict[str, Any], path: str) -> "InputDim":
        """The placeholder a saved config records (`{"axis": -1}`)."""
        if "axis" not in config:
            raise ValueError(
                f"The saved config entry `{path}` is an input-size "
                "placeholder without its axis (expected "
                '`{"__keras_flax__": "input_dim", "axis": -1}`). Received: '
                f"{config!r}. The file was altered or is corrupted; it was "
                "not loaded."
            )
        return cls(config["axis"])


def input_dim_axis(axis: Any) -> str:
    return (
        "`FlaxLayer.input_dim(axis)` takes a non-batch axis of the input, an "
        "int other than 0 (the batch axis, whose size is unknown at build; "
        f"-1 is the last). Received: axis={axis!r}. Give the axis whose "
        "size the argument takes, e.g. `FlaxLayer.input_dim(-1)`."
    )


def is_input_dim(value: Any) -> bool:
    return isinstance(value, InputDim)


def find(args: Any, kwargs: Any) -> list[InputDim]:
    """The placeholders among constructor arguments (also inside lists,
    tuples and dicts)."""
    found: list[InputDim] = []
    _walk((args, kwargs), lambda leaf: found.append(leaf) or leaf)
    return found


def refuse_in_fields(module: Any) -> None:
    """Refuses a linen module holding a placeholder in a field."""
    for field in dataclasses.fields(module):
        if find(getattr(module, field.name, None), {}):
            raise ValueError(
                input_dim_in_module(type(module).__name__, field.name)
            )


def input_dim_in_module(cls_name: str, field: str) -> str:
    return (
        f"`module` {cls_name} holds `FlaxLayer.input_dim()` in its field "
        f"`{field}`, which only `FlaxLayer.from_nnx` fills. Received: a "
        "module constructed with it. A linen module takes its input sizes "
        "from its inputs already: leave the size out; for an NNX module "
        "class, use `FlaxLayer.from_nnx(module_class, FlaxLayer.input_dim(), "
        "...)`."
    )


def fill(
    args: Any, kwargs: Any, spec: _inputs.Specs, layer_name: str
) -> tuple[Any, Any]:
    """`(args, kwargs)` with each placeholder replaced by its dimension of
    the input of `spec` (one array, that dimension known).

    Raises:
        ValueError: naming the input spec, where it cannot fill one.
    """
    leaves = spec.leaves()
    if len(leaves) != 1:
        raise ValueError(input_dim_not_one_input(layer_name, spec))
    shape = leaves[0].shape

    def size(placeholder: InputDim) -> int:
        axis = placeholder.axis
        if not -len(shape) <= axis < len(shape) or axis % len(shape) == 0:
            raise ValueError(input_dim_out_of_range(layer_name, axis, spec))
        found = shape[axis]
        if found is None:
            raise ValueError(input_dim_unknown(layer_name, axis, spec))
        return int(found)

    return _walk((args, kwargs), size)


def input_dim_not_one_input(layer_name: str, spec: Any) -> str:
    return (
        f"Layer '{layer_name}' fills `FlaxLayer.input_dim()` from its input, "
        f"which must be one array. Received: inputs {spec}. Call the layer "
        "on one array, or give the module its sizes explicitly."
    )


def input_dim_out_of_range(layer_name: str, axis: int, spec: Any) -> str:
    return (
        f"Layer '{layer_name}' fills `FlaxLayer.input_dim({axis})` from axis "
        f"{axis} of its input, which has no such non-batch axis. Received: "
        f"inputs {spec}. Give an axis of the input other than the batch "
        "axis (-1 is the last)."
    )


def input_dim_unknown(layer_name: str, axis: int, spec: Any) -> str:
    return (
        f"Layer '{layer_name}' fills `FlaxLayer.input_dim({axis})` from axis "
        f"{axis} of its input, whose size is unknown. Received: inputs "
        f"{spec}. Give that size in `keras.Input(shape=...)`."
    )


def _walk(value: Any, fn: Callable[[InputDim], Any]) -> Any:
    """`value` with each placeholder in it replaced by `fn(placeholder)`.

    Lists, tuples, NamedTuples and dicts are looked into; a container is
    rebuilt, as its own type, only where a placeholder was replaced inside
    it, and is otherwise returned as it is (the same object). Any other
    object (an `nnx.Rngs`, a dtype, a dataclass) is kept as it is.
    """
    if is_input_dim(value):
        return fn(value)
    if isinstance(value, (list, tuple)):
        items = [_walk(item, fn) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return rebuilt(value, items)
    if isinstance(value, dict):
        items = {key: _walk(item, fn) for key, item in value.items()}
        if all(items[key] is item for key, item in value.items()):
            return value
        return type(value)(items)
    return value


def rebuilt(container: list | tuple, items: list[Any]) -> Any:
    """A list or tuple of `container`'s own type holding `items` (a
    NamedTuple, by its documented `_fields`, takes them apart)."""
    named = getattr(type(container), "_fields", None) is not None
    if isinstance(container, tuple) and named:
        return type(container)(*items)
    return type(container)(items)
