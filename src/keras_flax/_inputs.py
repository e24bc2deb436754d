"""Input specs: what a layer is built for, placeholders, and input checks.

Keras' `build(input_shape)` gets shapes only; the layer records the inputs'
dtypes when it is first called, so that integer token ids are initialised
with integer placeholders.
"""

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import _errors
from keras_flax import _user_code
from keras_flax._model import PyTree

# Sizes tried, in order, for unknown dimensions when initialising.
CANDIDATE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Shape (None for unknown sizes) and dtype of one input array.

    The batch dimension (the first) is unknown in `shape`; `batch` is the
    batch size the layer was first given, if known, which initialisation
    uses as `keras.layers.JaxLayer` does.
    """

    shape: tuple
    dtype: Any
    batch: Any = None

    def __str__(self) -> str:
        return f"{_errors.format_shape(self.shape)} {jnp.dtype(self.dtype)}"


class Specs:
    """A PyTree of `Spec`s, held in an object that Keras does not track.

    (Keras wraps dicts set as layer attributes into its own dict class,
    which JAX would take for a leaf.)
    """

    def __init__(
        self, tree: PyTree, guessed: Any = False, size: int | None = None
    ) -> None:
        self.tree = tree
        self.guessed = guessed  # dtypes not known from the inputs
        self.size = size  # the size given to unknown dimensions at init

    def found(self, dtype: Any, size: int | None) -> "Specs":
        """These specs as `search` found them to work: with all dtypes
        `dtype` (None: unchanged) and `size` for unknown dimensions."""
        tree = self.tree
        if dtype is not None:
            tree = jax.tree_util.tree_map(
                lambda s: dataclasses.replace(s, dtype=jnp.dtype(dtype)), tree
            )
        return Specs(tree, self.guessed, size)

    def dtype_names(self) -> Any:
        return jax.tree_util.tree_map(
            lambda s: jnp.dtype(s.dtype).name, self.tree
        )

    def leaves(self) -> Any:
        return jax.tree_util.tree_leaves(self.tree)

    def __str__(self) -> str:
        leaves, treedef = jax.tree_util.tree_flatten(self.tree)
        if treedef.num_nodes == 1:
            return str(leaves[0])
        texts = [str(s) for s in leaves]
        return str(jax.tree_util.tree_unflatten(treedef, texts))


def _unknown_batch(shape: Sequence[int | None]) -> tuple[int | None, ...]:
    return (None, *shape[1:]) if shape else tuple(shape)


def _spec(shape: Sequence[int | None], dtype: Any) -> Spec:
    """The spec of an input of `shape`, its batch size kept aside."""
    batch = shape[0] if shape else None
    return Spec(_unknown_batch(shape), dtype, batch)


def record(inputs: PyTree, float_dtype: Any) -> Specs:
    """The spec of `inputs` (arrays or Keras tensors), batch size unknown.

    Float inputs are recorded in `float_dtype`, the dtype Keras casts them
    to before `call`.
    """

    def spec(x: Any) -> Spec:
        dtype = dtype_of(x)
        if jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.dtype(float_dtype)
        else:
            dtype = jax.dtypes.canonicalize_dtype(dtype)
        return _spec(shape_of(x), dtype)

    return Specs(jax.tree_util.tree_map(spec, inputs))


def shape_of(x: Any) -> tuple[int | None, ...]:
    """The shape of an array or tensor of any backend.

    None for an unknown size, and for a symbolic one (`jax.export` and
    Keras' exporters trace with symbolic dimensions): nothing here needs a
    concrete size while tracing.
    """
    shape = getattr(x, "shape", None)
    if shape is None:
        return tuple(np.shape(x))
    return tuple(_size(d) for d in shape)


def _size(d: Any) -> int | None:
    return int(d) if isinstance(d, (int, np.integer)) else None


def dtype_of(x: Any) -> Any:
    """The NumPy dtype of an array or tensor of any backend."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return np.asarray(x).dtype
    return jnp.dtype(keras.backend.standardize_dtype(dtype))


def from_shape(input_shape: Any, dtype: Any, dtype_names: Any = None) -> Specs:
    """The spec for a Keras `input_shape` (one shape or a structure).

    `dtype_names`, a structure of dtype names like the inputs' (as saved
    by the layer's build config), gives the dtypes; else `dtype` is a guess.
    """
    if dtype_names is None:
        tree = keras.tree.map_shape_structure(
            lambda s: _spec(tuple(s), jnp.dtype(dtype)), input_shape
        )
        return Specs(tree, guessed=True)
    shapes = []
    keras.tree.map_shape_structure(
        lambda s: shapes.append(tuple(s)), input_shape
    )
    names = keras.tree.flatten(dtype_names)
    specs = [_spec(s, jnp.dtype(n)) for s, n in zip(shapes, names, strict=True)]
    return Specs(keras.tree.pack_sequence_as(dtype_names, specs))


def has_unknown(specs: "Specs", skip_batch: bool) -> bool:
    """Whether a placeholder for `specs` needs a size made up (with
    `skip_batch`, other than for the batch dimension)."""

    def dims(s: Spec) -> tuple[Any, ...]:
        if skip_batch or s.batch is not None:
            return s.shape[1:]
        return s.shape

    return any(d is None for s in specs.leaves() for d in dims(s))


def unknown_dimensions(inputs: PyTree) -> list[tuple[int, int]]:
    """`(input index, dimension)` of each unknown size but the batch's."""
    return [
        (i, axis)
        for i, x in enumerate(jax.tree_util.tree_leaves(inputs))
        for axis, d in enumerate(shape_of(x))
        if axis > 0 and d is None
    ]


def placeholders(specs: "Specs", size: int | None, dtype: Any = None) -> Any:
    """Arrays for `specs`: the first batch size given, else `size`, for the
    batch dimension, and `size` for other unknown dimensions."""

    def make(s: Spec) -> Any:
        shape = tuple(size if d is None else d for d in s.shape)
        if shape and s.batch is not None:
            shape = (s.batch, *shape[1:])
        kind = jnp.dtype(dtype or s.dtype)
        fill = jnp.ones if jnp.issubdtype(kind, jnp.floating) else jnp.zeros
        return fill(shape, kind)

    return jax.tree_util.tree_map(make, specs.tree)


def search(fn: Callable[..., Any], specs: Any, arg: str) -> tuple[Any, Any]:
    """Calls `fn(placeholders)` with the first sizes the module accepts.

    Unknown dimensions are tried with each of `CANDIDATE_SIZES`; if the
    dtypes were guessed (the layer was built from a shape alone), integer
    placeholders are tried last. Returns `fn`'s result and the specs that
    worked. Raises a `ValueError` naming the inputs and how to give their
    shape when nothing works.
    """
    sizes = CANDIDATE_SIZES if has_unknown(specs, skip_batch=False) else (1,)
    dtypes = (None, jnp.int32) if specs.guessed else (None,)
    first_error = None
    for dtype in dtypes:
        for size in sizes:
            result = _user_code.attempt(fn, placeholders(specs, size, dtype))
            if not isinstance(result, _user_code.Refused):
                return result, specs.found(dtype, size)
            first_error = first_error or result.error  # the next size
    raise ValueError(
        cannot_initialize(arg, str(specs), sizes, first_error)
    ) from first_error


def cannot_initialize(
    arg: str, input_desc: str, tried: Any, error: BaseException | None
) -> str:
    return (
        f"`{arg}` failed on placeholder inputs {input_desc} while building "
        f"the layer (unknown dimensions tried with sizes {tried}). The "
        f"module raised: {type(error).__name__}: {error}. Give the input "
        "shape in full, e.g. `keras.Input(shape=(28, 28, 3))`, or pass "
        "initial weights (`variables=module.init(rng, x)`)."
    )
