"""Arrays between R and Python for the R package (`r/kerasflax`).

reticulate converts arrays through NumPy's C API, which its older releases
(Debian's 1.28, for one) cannot do with NumPy 2, which JAX needs. Raw bytes
in R's column-major order cross with every release: R's `writeBin` gives a
`bytearray` here, and a `bytearray` returned becomes an R raw vector.
"""

import typing
from typing import Any

import jax
import numpy as np
from flax import nnx

from keras_flax._model import PyTree

# R's vector types and their bytes (little-endian, as R writes them).
_R_BYTES = {"double": "<f8", "integer": "<i4", "logical": "<i4"}
_INT32 = np.iinfo(np.int32)


def from_r(data: Any, kind: Any, dims: Any, dtype: Any) -> np.ndarray:
    """An R vector's bytes -> a NumPy array of `dtype` and shape `dims`.

    >>> import struct
    >>> data = bytearray(struct.pack("<4d", 1, 2, 3, 4))
    >>> from_r(data, "double", [2, 2], "float32")
    array([[1., 3.],
           [2., 4.]], dtype=float32)
    """
    array = np.frombuffer(bytes(data), dtype=_R_BYTES[kind])
    return array.reshape(tuple(dims), order="F").astype(dtype)


class RArray(typing.NamedTuple):
    """An array as R builds it: bytes, R type, dims."""

    data: bytearray
    kind: str
    dims: list


def to_r(array: Any) -> RArray:
    """An array -> `(bytes in column-major order, R type, dims)`.

    Booleans become R logicals, integers that fit R integers, everything
    else R doubles.

    >>> data, kind, dims = to_r(np.array([[1, 2], [3, 4]], np.int32))
    >>> np.frombuffer(bytes(data), "<i4").tolist(), kind, dims
    ([1, 3, 2, 4], 'integer', [2, 2])
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        kind = "logical"
    elif np.issubdtype(array.dtype, np.integer) and (
        array.size == 0
        or (array.min() >= _INT32.min and array.max() <= _INT32.max)
    ):
        kind = "integer"
    else:
        kind = "double"
    data = array.astype(_R_BYTES[kind]).tobytes(order="F")
    return RArray(bytearray(data), kind, list(array.shape))


def tree_to_r(tree: PyTree) -> Any:
    """`to_r` on every leaf of a tree of arrays or Keras variables (an NNX
    `State` as its pure dict); dicts, lists and tuples stay."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return jax.tree_util.tree_map(to_r, tree)
