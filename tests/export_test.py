"""Exporting models that hold our layers on the JAX backend: `jax.export`
with a symbolic batch dimension, and Keras' ONNX export (jax2onnx).

Nothing in the layer needs a concrete dimension while tracing: the input
check treats a symbolic dimension as unknown.
"""

import subprocess
import sys
import textwrap

import jax
import keras
import numpy as np
import onnxruntime
import pytest

from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from tests import modules
from tests.conftest import data


def trained_model():
    """A linen layer (BatchNorm, Dropout) and a JaxLayer, after `fit`."""
    model = keras.Sequential(
        [
            keras.Input((5,)),
            FlaxLayer(modules.BatchNormDropout(), seed=0),
            JaxLayer(modules.dense_call, modules.dense_init, seed=1),
        ]
    )
    model.compile("adam", "mse")
    model.fit(data(16, 5), data(16, 3), epochs=2, batch_size=8, verbose=0)
    model(data(2, 5))  # Keras' exporters ask for a model that was called
    return model


def test_jax_export_with_a_symbolic_batch_serves_what_predict_returns(
    tmp_path,
):
    model = trained_model()
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def serve(x):
        return model.stateless_call(trainable, non_trainable, x)[0]

    (batch,) = jax.export.symbolic_shape("b")
    exported = jax.export.export(jax.jit(serve))(
        jax.ShapeDtypeStruct((batch, 5), "float32")
    )
    restored = jax.export.deserialize(exported.serialize())
    for n in (1, 7):
        x = data(n, 5, seed=n)
        np.testing.assert_allclose(
            restored.call(x), model.predict(x, verbose=0), 1e-6, 1e-6
        )

    # The artifact runs with JAX alone: no Keras, no Flax imported.
    (tmp_path / "model.bin").write_bytes(exported.serialize())
    x = data(3, 5, seed=3)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(
        """
        import sys
        import jax, numpy as np
        folder = sys.argv[1]
        with open(folder + "/model.bin", "rb") as f:
            restored = jax.export.deserialize(bytearray(f.read()))
        np.save(folder + "/y.npy", restored.call(np.load(folder + "/x.npy")))
        assert not {"keras", "flax", "keras_flax"} & set(sys.modules)
        """
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), model.predict(x, verbose=0), 1e-6, 1e-6
    )


@pytest.mark.parametrize("layer", ["linen", "jax"])
def test_onnx_export_serves_what_predict_returns(layer, tmp_path):
    if layer == "linen":
        inner = FlaxLayer(modules.BatchNormDropout(), seed=0)
    else:
        inner = JaxLayer(modules.dense_call, modules.dense_init, seed=1)
    model = keras.Sequential([keras.Input((5,)), inner])
    model(data(2, 5))
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(path)
    (name,) = [i.name for i in session.get_inputs()]
    for n in (1, 7):
        x = data(n, 5, seed=n)
        (got,) = session.run(None, {name: x})
        np.testing.assert_allclose(got, model.predict(x, verbose=0), 1e-5, 1e-6)
