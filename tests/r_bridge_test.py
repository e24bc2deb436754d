"""The byte-level array bridge the R package uses (keras_flax._r)."""

import numpy as np
import pytest

from keras_flax import _r


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.array([[True, False], [False, True]]),
        np.arange(-3, 3, dtype=np.int64),
        np.float32(2.5),
    ],
    ids=["float 3-d", "bool", "int64 in range", "scalar"],
)
def test_round_trip_keeps_values_and_shape(array):
    data, kind, dims = _r.to_r(array)
    dtype = {"double": "float32", "integer": "int64", "logical": "bool"}[kind]

    back = _r.from_r(data, kind, dims, dtype)

    np.testing.assert_array_equal(back, np.asarray(array).astype(dtype))
    assert back.shape == np.shape(array)


def test_column_major_order_matches_r_indexing():
    array = np.arange(6).reshape(2, 3)
    data, kind, dims = _r.to_r(array)
    # R's x[i, j] is element (i - 1) + (j - 1) * nrow of its vector.
    flat = np.frombuffer(bytes(data), "<i4")
    assert kind == "integer" and dims == [2, 3]
    assert [flat[i + j * 2] for i in range(2) for j in range(3)] == list(
        array.ravel()
    )


def test_integers_beyond_r_integers_become_doubles():
    _, kind, _ = _r.to_r(np.array([2**40], dtype=np.int64))
    assert kind == "double"
