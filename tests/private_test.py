"""The public fallback of each private Keras / JAX name in `_private`."""

import keras
import numpy as np
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import _private
from tests import modules
from tests import nnx_modules
from tests.conftest import data
from tests.conftest import onnx_outputs


def test_without_keras_scope_getters_values_are_read_through_value(
    monkeypatch,
):
    layer = FlaxLayer(modules.MLP(), seed=0)
    x = data(3, 5)
    layer(x)
    monkeypatch.setattr(_private, "SCOPE_CHECKS", None)
    assert _private.held_values(layer.variables) is None
    want = modules.MLP().apply(layer.flax_variables, x)
    np.testing.assert_allclose(layer(x), want, 1e-6, 1e-6)


def _paths(layer):
    """Weight paths below the model's name."""
    return tuple(
        [w.path.split("/", 1)[1] for w in weights]
        for weights in (layer.trainable_weights, layer.non_trainable_weights)
    )


def test_without_track_variable_weights_are_tracked_as_attributes(
    monkeypatch,
):
    tracked = FlaxLayer(modules.BatchNormOnly(), seed=0, name="net")
    keras.Sequential([keras.Input((5,)), tracked])
    monkeypatch.setattr(_private, "TRACK_VARIABLE", False)
    layer = FlaxLayer(modules.BatchNormOnly(), seed=0, name="net")
    model = keras.Sequential([keras.Input((5,)), layer])
    assert _paths(layer) == _paths(tracked)
    before = np.asarray(layer.params["params"]["Dense_0"]["kernel"].value)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(data(8, 5), data(8, 1, seed=1), verbose=0)
    after = layer.params["params"]["Dense_0"]["kernel"].value
    assert not np.array_equal(before, after)


def test_without_safe_mode_getter_safe_mode_is_assumed(monkeypatch):
    monkeypatch.setattr(_private, "_safe_mode", None)
    assert _private.in_safe_mode()
    config = {
        **FlaxLayer(modules.MLP()).get_config(),
        "method": {"__keras_flax__": "object", "path": "os:system"},
    }
    with pytest.raises(ValueError, match="refused to resolve os:system"):
        FlaxLayer.from_config(config)


def test_without_variable_hooks_the_module_is_synced_when_read(monkeypatch):
    monkeypatch.setattr(_private, "VARIABLE_HOOKS", False)
    module = nnx_modules.MLP(nnx.Rngs(0))
    initial = np.asarray(module.linear1.kernel.get_value())
    layer = FlaxLayer(module)
    assert not any(
        isinstance(v, _private.FlaxVariable) for v in layer.variables
    )
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(data(8, 4), data(8, 2, seed=1), verbose=0)
    trained = np.asarray(layer.params["linear1"]["kernel"].value)
    assert not np.array_equal(trained, initial)
    np.testing.assert_array_equal(
        layer.module.linear1.kernel.get_value(), trained
    )


def test_without_a_layout_map_attribute_flax_axes_apply():
    assert not _private.layout_map_has(object(), "layer/kernel")


def test_compile_once_falls_back_to_default_options():
    class Lowered:
        def compile(self, compiler_options=None):
            if compiler_options is not None:
                raise RuntimeError("no such option on this platform")
            return "compiled"

    assert _private.compile_once(Lowered()) == "compiled"


def test_without_frames_onnx_export_runs_as_jax2onnx_runs_it(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(_private, "FRAMES", False)
    assert not _private.jax2onnx_converting()
    model = keras.Sequential(
        [keras.Input((5,)), FlaxLayer(modules.MLP(), seed=0)]
    )
    x = data(2, 5)
    model(x)
    out = onnx_outputs(model, x, tmp_path / "model.onnx")
    np.testing.assert_allclose(out, model.predict(x, verbose=0), 1e-5, 1e-5)
