"""layer_flax_module_wrapper / layer_jax_model_wrapper (SPEC section 4)."""

import keras
import numpy as np

from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import layer_flax_module_wrapper
from keras_flax import layer_jax_model_wrapper
from tests import modules
from tests.conftest import data


def test_sequential_gets_the_layer_in_place_and_is_returned():
    model = keras.Sequential([keras.Input((5,))])
    returned = layer_flax_module_wrapper(model, module=modules.MLP(), seed=0)
    assert returned is model
    assert isinstance(model.layers[-1], FlaxLayer)
    assert model.output_shape == (None, 4)
    layer = model.layers[-1]
    x = data(2, 5)
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        modules.MLP().apply(layer.flax_variables, x),
        1e-6,
    )


def test_keras_tensor_gives_the_output_tensor():
    inputs = keras.Input((28, 28, 3))
    outputs = layer_flax_module_wrapper(inputs, module=modules.CNN(), seed=0)
    assert keras.utils.is_keras_tensor(outputs)
    model = keras.Model(inputs, outputs)
    assert model.output_shape == (None, 10)
    assert isinstance(model.layers[-1], FlaxLayer)


def test_array_gives_the_layer_output():
    x = data(3, 5)
    out = layer_flax_module_wrapper(x, module=modules.MLP(), seed=0)
    assert out.shape == (3, 4)


def test_none_gives_the_layer_with_its_arguments():
    layer = layer_flax_module_wrapper(
        module=modules.MLP(), method="encode", name="enc", seed=3
    )
    assert isinstance(layer, FlaxLayer)
    assert (layer.name, layer.method, layer.seed) == ("enc", "encode", 3)


def test_jax_model_wrapper_semantics():
    model = keras.Sequential([keras.Input((5,))])
    returned = layer_jax_model_wrapper(
        model, call_fn=modules.dense_call, init_fn=modules.dense_init, seed=0
    )
    assert returned is model and isinstance(model.layers[-1], JaxLayer)
    inputs = keras.Input((5,))
    outputs = layer_jax_model_wrapper(
        inputs, call_fn=modules.dense_call, init_fn=modules.dense_init
    )
    assert tuple(outputs.shape) == (None, 3)
    layer = layer_jax_model_wrapper(
        call_fn=modules.dense_call, init_fn=modules.dense_init
    )
    assert isinstance(layer, JaxLayer) and not layer.built
