"""A wrapped module's inside, as `model.summary(expand_nested=True)` shows it.

Keras expands a layer that has a non-empty `layers` list, printing a row
for each of its items (and for theirs, nested): the item's `name`, its
class name, `count_params()` and its output shape. A layer's `layers` are
`Row`s here, one per submodule of the wrapped module (path, class,
parameters, outputs where known), as `nnx.tabulate` lists them, in the
order the model gives them (linen: the order of the calls). A row
counts every weight under its path once, where the weight is held (a
shared submodule is listed at its first path, as NNX splits it; stacked
and scanned layers are one row, their stacked weights counted whole), so
the rows of one level add up to the row (or the layer) above. A weight
held directly by a module that has submodules gets a row of its own.
"""

import dataclasses
import functools
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax

from keras_flax import _private

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Weight:
    """One weight of the layer: its path in the module, and its count."""

    path: Path
    size: int
    trainable: bool


class Count(int):
    """A row's parameter count, which Keras prints as `f"{count:,}"`: the
    non-trainable part is told where there is one ("1,290 (20
    non-trainable)")."""

    non_trainable: int

    def __new__(cls, total: int, non_trainable: int) -> "Count":
        count = super().__new__(cls, total)
        count.non_trainable = non_trainable
        return count

    def __format__(self, spec: str) -> str:
        text = format(int(self), spec)
        if self.non_trainable and self.non_trainable != int(self):
            text += f" ({self.non_trainable:{spec}} non-trainable)"
        elif self.non_trainable:
            text += " (non-trainable)"
        return text


class Row:
    """A submodule (or a weight) as Keras' summary prints a nested layer.

    Attributes:
        name: its path in the module (`block1/linear`).
        layers: its own submodules' rows.
        output_shape: the shape of its first call's output (None for
            unknown sizes), where it returned one array; absent otherwise.
        weights: the sizes of the weights it holds (Keras' summary asks
            whether there are any).
        trainable: whether any of them trains.
    """

    built = True

    def __init__(
        self,
        name: str,
        weights: Sequence[Weight],
        output_shape: tuple[int | None, ...] | None,
        layers: list["Row"],
    ) -> None:
        self.name = name
        self.layers = layers
        self.weights = [w.size for w in weights]
        self.trainable = any(w.trainable for w in weights)
        total = sum(w.size for w in weights)
        frozen = sum(w.size for w in weights if not w.trainable)
        self._count = Count(total, frozen)
        if output_shape is not None:
            self.output_shape = output_shape
        _private.set_summary_row(self, output_shape)

    def count_params(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {int(self._count)}>"


def weights(
    structure: Any,
    leaf_sizes: Sequence[tuple[bool, tuple[str, ...], int, bool]],
    trainable: bool,
) -> list[Weight]:
    """Every weight of a layer, from `Weights.leaf_sizes()` (`(in params,
    path parts, size, trains)`), at its path in the module
    (`Structure.path_of`); none trains in a frozen layer."""
    return [
        Weight(
            path=structure.path_of(in_params, parts),
            size=size,
            trainable=trains and trainable,
        )
        for in_params, parts, size, trains in leaf_sizes
    ]


@functools.cache
def _row_class(label: str) -> type:
    """A `Row` class named `label` (Keras prints a row's class name)."""
    return type(label, (Row,), {"__module__": __name__})


def rows(
    nodes: Mapping[Path, tuple[str, Any]], weights: Sequence[Weight]
) -> list[Row]:
    """The rows under the module's root.

    Args:
        nodes: `path -> (label, output shape or None)` of the submodules
            (label: the class name) and of the weights (label: their
            Variable type or collection), in the order rows are listed.
        weights: every weight of the layer.
    """
    nodes = {_text_path(path): node for path, node in nodes.items()}
    weights = [dataclasses.replace(w, path=_text_path(w.path)) for w in weights]
    held = {w.path for w in weights}
    modules = [path for path in nodes if path and path not in held]
    for weight in weights:  # modules the structure did not name
        modules += [weight.path[:i] for i in range(1, len(weight.path))]
    modules = list(dict.fromkeys(modules))  # in order, once each

    def children(parent: Path) -> list[Row]:
        found = [
            row(path)
            for path in modules
            if len(path) == len(parent) + 1 and path[:-1] == parent
        ]
        if found or not parent:
            # Weights held here beside submodules: a row each.
            found += [
                row(w.path, [w])
                for w in weights
                if w.path[:-1] == parent and w.path not in modules
            ]
        return found

    def row(path: Path, own: Sequence[Weight] | None = None) -> Row:
        label, output = nodes.get(path, ("?", None))
        inside = own
        if inside is None:
            inside = [w for w in weights if w.path[: len(path)] == path]
        return _row_class(label)(
            "/".join(path),
            inside,
            output,
            [] if own is not None else children(path),
        )

    return children(())


def _text_path(path: Path) -> tuple[str, ...]:
    """A path with its keys as text (`("blocks", 0)` as in weight names,
    `("blocks", "0")`)."""
    return tuple(str(part) for part in path)


def outputs_shape(outputs: Any) -> tuple[int | None, ...] | None:
    """The shape of `outputs` where it is one array (None for symbolic
    sizes), else None."""
    leaves = jax.tree_util.tree_leaves(outputs)
    if len(leaves) != 1 or not hasattr(leaves[0], "shape"):
        return None
    return tuple(d if isinstance(d, int) else None for d in leaves[0].shape)
