"""Property-based equivalence with Flax on generated modules (hypothesis).

Random stacks of Dense/Conv/LayerNorm/BatchNorm/Dropout/Embed/attention,
with random sizes, dtypes and input PyTrees (an array, a tuple, a dict),
in linen and NNX. Bounded for CI; `pytest --hypothesis-profile=long` runs
hundreds.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from keras_flax import FlaxLayer
from tests.conftest import flax_grads
from tests.conftest import keras_grads
from tests.property_modules import NNXStack
from tests.property_modules import Stack

# 16 generated linen and 16 NNX modules: run by `pytest -m slow` (CI).
pytestmark = pytest.mark.slow

BLOCKS = st.one_of(
    st.tuples(st.just("dense"), st.integers(2, 8)),
    st.tuples(st.just("layernorm")),
    st.tuples(st.just("batchnorm")),
    st.tuples(st.just("dropout"), st.sampled_from([0.1, 0.5])),
    st.tuples(st.just("conv"), st.integers(2, 6), st.integers(1, 3)),
    st.tuples(st.just("attention"), st.integers(1, 2)),
)


@st.composite
def inputs(draw, tokens_allowed=True):
    """`(inputs, features, vocab)`: float arrays in a PyTree, or tokens."""
    batch, time = draw(st.integers(1, 4)), draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(
        st.sampled_from(
            ["array", "tuple", "dict"] + (["tokens"] if tokens_allowed else [])
        )
    )
    if kind == "tokens":
        vocab = draw(st.integers(3, 20))
        return rng.integers(0, vocab, (batch, time)).astype("int32"), 4, vocab
    sizes = [
        draw(st.integers(1, 5)) for _ in range(1 if kind == "array" else 2)
    ]
    arrays = [
        rng.normal(size=(batch, time, f)).astype("float32") for f in sizes
    ]
    tree = {
        "array": lambda: arrays[0],
        "tuple": lambda: tuple(arrays),
        "dict": lambda: {"a": arrays[0], "b": arrays[1]},
    }[kind]()
    return tree, sum(sizes), 0


def _close(a, b, dtype):
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, "float32"), np.asarray(y, "float32"), tol, tol
        )


def _keras_round_trip(layer, x, tmp_path, name):
    inputs = jax.tree.map(
        lambda a: keras.Input(a.shape[1:], dtype=str(a.dtype)), x
    )
    if isinstance(inputs, dict):
        inputs = {k: keras.Input(v.shape[1:], name=k) for k, v in x.items()}
    model = keras.Model(inputs, layer(inputs))
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


@given(
    blocks=st.lists(BLOCKS, min_size=1, max_size=4).map(tuple),
    sample=inputs(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 100),
)
def test_generated_linen_modules_equal_flax(
    blocks, sample, dtype, seed, tmp_path_factory
):
    x, _, vocab = sample
    module = Stack(blocks=blocks, dtype=dtype, vocab=vocab)
    layer = FlaxLayer(module, seed=seed)
    out = layer(x)
    variables = layer.flax_variables
    _close(out, module.apply(variables, x), dtype)
    if "params" not in variables:  # e.g. a lone Dropout
        assert not layer.trainable_weights
    elif dtype == jnp.float32 and not vocab:
        _close(keras_grads(layer, x), flax_grads(module, variables, x), dtype)
    again = FlaxLayer(module, variables=variables)
    np.testing.assert_array_equal(again(x), out)
    clone = FlaxLayer.from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x), out)
    _keras_round_trip(layer, x, tmp_path_factory.mktemp("linen"), "m")


@given(
    blocks=st.lists(BLOCKS, min_size=1, max_size=4).map(tuple),
    sample=inputs(tokens_allowed=False),
    seed=st.integers(0, 100),
)
def test_generated_nnx_modules_equal_nnx(
    blocks, sample, seed, tmp_path_factory
):
    x, features, _ = sample
    module = NNXStack(blocks, features, rngs=nnx.Rngs(seed))
    reference = nnx.clone(module)
    reference.eval()
    layer = FlaxLayer.from_nnx(NNXStack, blocks, features, rngs=nnx.Rngs(seed))
    out = layer(x)
    _close(out, reference(x), jnp.float32)

    want = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(reference)
    _close(keras_grads(layer, x), jax.tree.leaves(want), jnp.float32)

    copy = nnx.clone(reference)
    nnx.update(copy, layer.flax_variables)
    # Eager NNX against the compiled layer: equal up to float rounding.
    np.testing.assert_allclose(copy(x), out, rtol=1e-5, atol=1e-6)
    _keras_round_trip(layer, x, tmp_path_factory.mktemp("nnx"), "m")
