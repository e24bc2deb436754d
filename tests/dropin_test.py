"""Code written for keras.layers.FlaxLayer / JaxLayer runs unchanged."""

import jax
import keras
import numpy as np
import pytest

import keras_flax
from tests import modules
from tests.conftest import data

FLAX_LAYERS = [keras.layers.FlaxLayer, keras_flax.FlaxLayer]
JAX_LAYERS = [keras.layers.JaxLayer, keras_flax.JaxLayer]
IDS = ["keras", "keras_flax"]


@pytest.mark.parametrize("FlaxLayer", FLAX_LAYERS, ids=IDS)
def test_flax_layer_code_for_the_builtin(FlaxLayer):
    module = modules.BatchNormOnly()
    x, y = data(16, 5), data(16, 1, seed=1)
    variables = module.init(jax.random.key(0), x)
    want = module.apply(variables, x)  # the built-in may consume `variables`
    layer = FlaxLayer(module=module, method=None, variables=variables)
    assert layer.module is module and layer.method is None
    assert callable(layer.call_fn) and callable(layer.init_fn)
    kernel = layer.params["params"]["Dense_0"]["kernel"]
    mean = layer.state["batch_stats"]["BatchNorm_0"]["mean"]
    assert isinstance(kernel, keras.Variable) and kernel.trainable
    assert isinstance(mean, keras.Variable) and not mean.trainable
    model = keras.Sequential([keras.Input((5,)), layer])
    np.testing.assert_allclose(model.predict(x, verbose=0), want, 1e-5, 1e-6)
    before = np.asarray(kernel.value).copy()
    model.compile("adam", "mse")
    model.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(kernel.value, before)


@pytest.mark.parametrize("JaxLayer", JAX_LAYERS, ids=IDS)
def test_jax_layer_code_for_the_builtin(JaxLayer):
    params = modules.dense_init(jax.random.key(0), data(1, 5))
    layer = JaxLayer(call_fn=modules.dense_call, params=params, seed=1)
    assert layer.call_fn is modules.dense_call and layer.init_fn is None
    assert isinstance(layer.params["dense"]["w"], keras.Variable)
    x = data(3, 5)
    np.testing.assert_allclose(layer(x), modules.dense_call(params, x), 1e-6)


def _no_inputs(params, training):
    return params


def _extra(params, inputs, other):
    return inputs


@pytest.mark.parametrize("JaxLayer", JAX_LAYERS, ids=IDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"call_fn": _no_inputs, "params": {}},
        {"call_fn": _extra, "params": {}},
        {"call_fn": modules.dense_call},
    ],
    ids=["no-inputs", "extra-argument", "nothing-to-init"],
)
def test_same_error_types_as_the_builtin(JaxLayer, kwargs):
    with pytest.raises(ValueError):
        JaxLayer(**kwargs)


def test_seed_state_is_not_a_weight():
    layer = keras_flax.FlaxLayer(modules.DropoutOnly(), seed=0)
    layer(data(2, 8))
    assert all("seed" not in w.path for w in layer.weights)
    assert any("seed" in v.path for v in layer.non_trainable_variables)
    assert layer.count_params() == 8 * 32
