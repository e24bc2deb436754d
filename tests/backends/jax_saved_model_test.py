"""The JAX backend with TensorFlow installed: `model.export` as a
SavedModel (Keras converts the stateless call with jax2tf, tracing it with
a symbolic batch dimension). Collected only there (see conftest.py)."""

import keras
import numpy as np
import tensorflow as tf

from tests.conftest import data
from tests.export_test import serving_model


def test_saved_model_export_on_jax_serves_what_predict_returns(tmp_path):
    assert keras.backend.backend() == "jax"
    model = serving_model()
    path = str(tmp_path / "served")
    model.export(path, format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(path)
    for n in (1, 7):
        x = data(n, 5, seed=n)
        np.testing.assert_allclose(
            served.serve(x).numpy(), model.predict(x, verbose=0), 1e-6, 1e-6
        )
