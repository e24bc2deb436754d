"""TensorFlow only: jax2tf conversion, tracing and `model.export`."""

import equinox as eqx
import jax
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_flax import EquinoxLayer
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from tests import modules
from tests.backends.common_test import _EqxBatchNorm
from tests.conftest import data


def _xla_call_modules(function):
    graph = function.graph.as_graph_def()
    nodes = list(graph.node)
    nodes += [n for f in graph.library.function for n in f.node_def]
    return [n for n in nodes if n.op == "XlaCallModule"]


def test_export_serves_what_predict_returns(tmp_path):
    layer = FlaxLayer(modules.BatchNormDropout(), seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile("adam", "mse")
    model.fit(data(16, 5), data(16, 2), epochs=2, batch_size=8, verbose=0)
    model.export(str(tmp_path / "served"), verbose=False)

    served = tf.saved_model.load(str(tmp_path / "served"))
    for n in (1, 7):
        x = data(n, 5, seed=n)
        np.testing.assert_allclose(
            served.serve(x).numpy(),
            model.predict(x, verbose=0),
            rtol=1e-6,
            atol=1e-6,
        )
    spec = tf.TensorSpec((None, 5), tf.float32)
    calls = _xla_call_modules(served.serve.get_concrete_function(spec))
    assert calls
    for call in calls:  # the function and its gradient
        assert list(call.attr["platforms"].list.s) == [b"CPU"]


def test_native_serialization_platforms_reach_the_exported_module(tmp_path):
    layer = JaxLayer(
        modules.dense_call,
        modules.dense_init,
        seed=0,
        native_serialization_platforms=("cpu", "tpu"),
    )
    model = keras.Sequential([keras.Input((4,)), layer])
    model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    x = data(3, 4)
    np.testing.assert_allclose(
        served.serve(x).numpy(), model.predict(x, verbose=0), rtol=1e-6
    )
    spec = tf.TensorSpec((None, 4), tf.float32)
    calls = _xla_call_modules(served.serve.get_concrete_function(spec))
    assert calls
    for call in calls:
        assert list(call.attr["platforms"].list.s) == [b"CPU", b"TPU"]


def test_eager_calls_are_converted_once_and_traced_once_per_signature():
    layer = FlaxLayer(modules.MLP(), seed=0)
    for n in (2, 3, 5, 9):
        layer(data(n, 5))
    (converted,) = layer._runner._converted.values()
    # The first batch size, then one trace with an unknown batch size.
    assert converted.experimental_get_tracing_count() <= 2


def _mean_of_means(inputs):
    return sum(x.mean(axis=(1, 2)) for x in inputs)


def test_sixty_unknown_dimensions_get_names_of_their_own():
    inputs = [keras.Input((None, None)) for _ in range(30)]
    model = keras.Model(inputs, JaxLayer(_mean_of_means)(inputs))
    rng = np.random.default_rng(0)
    arrays = [
        rng.normal(size=(4, 2 + i % 3, 1 + i % 4)).astype("float32")
        for i in range(30)
    ]
    want = sum(a.mean(axis=(1, 2)) for a in arrays)
    np.testing.assert_allclose(
        model.predict(arrays, verbose=0), want, 1e-5, 1e-6
    )


def test_a_model_without_symbolic_batch_runs_per_batch_size_else_says_so():
    # Equinox's BatchNorm: `pmean` over the vmapped batch, which jax2tf
    # cannot convert for a symbolic batch size.
    bn, state = eqx.nn.make_with_state(_EqxBatchNorm)(jax.random.PRNGKey(1))
    layer = EquinoxLayer(bn, state=state)
    model = keras.Sequential([keras.Input((5,)), layer])
    x = data(30, 5)
    for n in (8, 6):  # a batch size each, the last batch a smaller one
        out = layer(x[:n], training=False)
        want = jax.vmap(
            eqx.nn.inference_mode(bn),
            axis_name="batch",
            in_axes=(0, None),
            out_axes=(0, None),
        )(x[:n], state)[0]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    y = data(30, 3, seed=2)
    model.fit(x[:24], y[:24], batch_size=8, verbose=0)  # batches of 8
    # 30 samples in batches of 8: Keras traces for an unknown batch size.
    with pytest.raises(ValueError) as raised:
        model.fit(x, y, batch_size=8, verbose=0)
    message = str(raised.value)
    assert f"Layer '{layer.name}'" in message
    assert "(None, 5)" in message and "dividing the number" in message
