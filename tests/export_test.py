"""Serving a model that holds our layers, on the JAX backend without
TensorFlow: Keras' ONNX export (jax2onnx) run by onnxruntime, and
`export_stablehlo` (`jax.export`) run by JAX alone, both against
`model.predict`.

Nothing in the layer needs a concrete dimension while tracing: batch (and
other unknown) sizes stay symbolic.
"""

import subprocess
import sys
import textwrap

import jax
import keras
import numpy as np
import onnxruntime
import pytest
from flax import nnx

import keras_flax
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from tests import modules
from tests import nnx_modules
from tests.conftest import data


def trained(layer, shape, outputs):
    """A model holding `layer`, after `fit` (state and seeds moved)."""
    model = keras.Sequential([keras.Input(shape), layer])
    model.compile("adam", "mse")
    x = data(16, *[4 if d is None else d for d in shape])
    model.fit(x, data(16, outputs), epochs=2, batch_size=8, verbose=0)
    return model


class PositionalPool(modules.nn.Module):
    """`nn.avg_pool` with positional arguments, as Flax allows (jax2onnx's
    stand-in for it takes them by keyword only)."""

    @modules.nn.compact
    def __call__(self, x):
        x = modules.nn.relu(modules.nn.Conv(4, (3, 3))(x))
        x = modules.nn.avg_pool(x, (2, 2), (2, 2), "VALID")
        return modules.nn.Dense(3)(x.reshape((x.shape[0], -1)))


class NNXPositionalPool(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv(x)), (2, 2), (2, 2))
        return self.head(x.reshape((x.shape[0], -1)))


# name: (layer, input shape, outputs, other sizes for a None dimension)
CASES = {
    "linen_positional_pool": (
        lambda: FlaxLayer(PositionalPool()),
        (8, 8, 1),
        3,
        (),
    ),
    "nnx_positional_pool": (
        lambda: FlaxLayer(NNXPositionalPool(nnx.Rngs(0))),
        (8, 8, 1),
        3,
        (),
    ),
    "linen_cnn": (lambda: FlaxLayer(modules.CNN()), (28, 28, 1), 10, ()),
    "linen_batchnorm_dropout": (
        lambda: FlaxLayer(modules.BatchNormDropout(), seed=0),
        (5,),
        2,
        (),
    ),
    "nnx_conv_batchnorm_dropout": (
        lambda: FlaxLayer(nnx_modules.ConvBatchNormDropout(nnx.Rngs(0))),
        (8, 8, 1),
        3,
        (),
    ),
    "nnx_attention": (
        lambda: FlaxLayer(nnx_modules.Attention(nnx.Rngs(0))),
        (None, 8),
        2,
        (6, 11),
    ),
    "jax_layer": (
        lambda: JaxLayer(modules.dense_call, modules.dense_init, seed=1),
        (5,),
        3,
        (),
    ),
}


def batches(shape, other_sizes):
    """Inputs at batch sizes 1, 7 and 64, and at each other size given
    for the unknown dimension."""
    fixed = [6 if d is None else d for d in shape]
    found = [data(n, *fixed, seed=n) for n in (1, 7, 64)]
    for size in other_sizes:
        found.append(data(3, *[size if d is None else d for d in shape]))
    return found


# Each case converts a model with jax2onnx (seconds): `pytest -m slow`.
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_onnx_export_serves_what_predict_returns(case, tmp_path):
    make, shape, outputs, other_sizes = CASES[case]
    model = trained(make(), shape, outputs)
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)

    session = onnxruntime.InferenceSession(path)
    (name,) = [i.name for i in session.get_inputs()]
    for x in batches(shape, other_sizes):
        (got,) = session.run(None, {name: x})
        np.testing.assert_allclose(got, model.predict(x, verbose=0), 1e-5, 1e-5)


def test_onnx_export_leaves_the_nnx_module_usable(tmp_path):
    """Export traces the eager call: no tracer may reach the Keras
    variables or the user's module (the keys of its Dropout stream)."""
    module = nnx_modules.ConvBatchNormDropout(nnx.Rngs(0))
    model = trained(FlaxLayer(module), (8, 8, 1), 3)
    model.export(str(tmp_path / "model.onnx"), format="onnx", verbose=False)
    x = data(4, 8, 8, 1)
    module.eval()
    np.testing.assert_allclose(
        module(x), model.predict(x, verbose=0), 1e-6, 1e-6
    )
    for variable in model.weights:
        assert not isinstance(variable.value, jax.core.Tracer)


class Callback(modules.nn.Module):
    """Runs a host callback, which no exported artifact can hold."""

    @modules.nn.compact
    def __call__(self, x):
        x = modules.nn.Dense(3)(x)
        spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(np.tanh, spec, x)


def test_onnx_export_names_an_unconvertible_operation_and_the_layer(tmp_path):
    model = keras.Sequential(
        [keras.Input((5,)), FlaxLayer(Callback(), name="with_callback")]
    )
    model(data(2, 5))
    path = tmp_path / "model.onnx"
    with pytest.raises(NotImplementedError) as raised:
        model.export(str(path), format="onnx", verbose=False)
    message = str(raised.value)
    assert "Layer 'with_callback' cannot be exported to ONNX" in message
    assert "Received: operations=['pure_callback']" in message
    assert "Fix: keep the operation out of the inference path" in message
    assert not path.exists()
    # The layer still predicts.
    assert model.predict(data(2, 5), verbose=0).shape == (2, 3)


def serving_model():
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
    return model


@pytest.mark.slow
def test_stablehlo_artifact_runs_with_jax_alone(tmp_path):
    model = serving_model()
    path = tmp_path / "model.stablehlo"
    exported = keras_flax.export_stablehlo(model, path, verbose=False)
    assert str(exported.in_avals[0].shape) == "(b, 5)"
    restored = jax.export.deserialize(bytearray(path.read_bytes()))
    for n in (1, 7, 64):
        x = data(n, 5, seed=n)
        np.testing.assert_allclose(
            restored.call(x), model.predict(x, verbose=0), 1e-6, 1e-6
        )

    # No Keras, no Flax imported.
    x = data(3, 5, seed=3)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(
        """
        import sys
        import jax, numpy as np
        folder = sys.argv[1]
        with open(folder + "/model.stablehlo", "rb") as f:
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


def test_stablehlo_keeps_every_unknown_dimension_symbolic(tmp_path):
    model = trained(FlaxLayer(nnx_modules.Attention(nnx.Rngs(0))), (None, 8), 2)
    exported = keras_flax.export_stablehlo(
        model, tmp_path / "m.stablehlo", verbose=False
    )
    assert str(exported.in_avals[0].shape) == "(b, a, 8)"
    for x in (data(1, 6, 8), data(7, 11, 8)):
        np.testing.assert_allclose(
            exported.call(x), model.predict(x, verbose=0), 1e-6, 1e-6
        )


def test_stablehlo_takes_named_inputs_and_a_given_signature(tmp_path):
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    model = keras.Model({"a": a, "b": b}, FlaxLayer(modules.MLP())(joined))
    x = {"a": data(4, 5), "b": data(4, 3, seed=1)}
    exported = keras_flax.export_stablehlo(
        model, tmp_path / "m.stablehlo", verbose=False
    )
    np.testing.assert_allclose(
        exported.call(x), model.predict(x, verbose=0), 1e-6, 1e-6
    )

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = FlaxLayer(modules.MLP())

        def call(self, x):
            return self.inner(x)

    subclassed = Subclassed()
    subclassed(data(2, 3))
    with pytest.raises(ValueError) as raised:
        keras_flax.export_stablehlo(subclassed, tmp_path / "s.stablehlo")
    message = str(raised.value)
    assert "needs `input_signature`" in message
    assert "Received: model=<Subclassed" in message
    assert "input_signature=keras.InputSpec(shape=(None, 5))" in message
    assert not (tmp_path / "s.stablehlo").exists()

    exported = keras_flax.export_stablehlo(
        subclassed,
        tmp_path / "s.stablehlo",
        input_signature=keras.InputSpec(shape=(None, 3)),
        verbose=False,
    )
    x = data(5, 3)
    np.testing.assert_allclose(
        exported.call(x), subclassed.predict(x, verbose=0), 1e-6, 1e-6
    )


def test_stablehlo_refuses_a_signature_of_sizes_with_the_fix(tmp_path):
    model = serving_model()
    path = tmp_path / "m.stablehlo"
    with pytest.raises(ValueError) as raised:
        keras_flax.export_stablehlo(model, path, input_signature=(None, 5))
    message = str(raised.value)
    assert (
        "`input_signature` must be a structure of `keras.InputSpec`" in message
    )
    assert "Received: input_signature=(None, 5) (tuple)" in message
    assert (
        "Fix: e.g. `input_signature=keras.InputSpec(shape=(None, 5))`"
        in message
    )
    assert not path.exists()
    # Fixed as the message says:
    exported = keras_flax.export_stablehlo(
        model,
        path,
        input_signature=keras.InputSpec(shape=(None, 5)),
        verbose=False,
    )
    x = data(4, 5)
    np.testing.assert_allclose(
        exported.call(x), model.predict(x, verbose=0), 1e-6, 1e-6
    )
