"""get_config / from_config, weights files, and Keras registration."""

import json

import flax.linen as nn
import jax
import keras
import numpy as np

from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from tests import modules
from tests.conftest import data


def test_both_classes_are_registered_for_keras_serialization():
    assert keras.saving.get_registered_name(FlaxLayer) == "keras_flax>FlaxLayer"
    assert keras.saving.get_registered_name(JaxLayer) == "keras_flax>JaxLayer"


def test_flax_layer_config_round_trip_rebuilds_the_same_module():
    module = modules.BatchNormDropout(rate=0.25)
    layer = FlaxLayer(module, method="__call__", seed=5, name="block")
    config = layer.get_config()
    clone = FlaxLayer.from_config(config)
    assert clone.module == module
    assert (clone.name, clone.seed, clone.method) == ("block", 5, "__call__")
    assert clone.get_config() == config


def test_config_with_free_function_method_and_nested_fields():
    module = modules.MLP(features=(8, 3))
    layer = FlaxLayer(module, method=modules.two_inputs_wrapper)
    clone = FlaxLayer.from_config(layer.get_config())
    assert clone.module == module
    assert clone.method is modules.two_inputs_wrapper


def test_jax_layer_config_round_trip():
    layer = JaxLayer(modules.dense_call, modules.dense_init, seed=2)
    clone = JaxLayer.from_config(layer.get_config())
    assert clone.call_fn is modules.dense_call
    assert clone.init_fn is modules.dense_init
    x = data(2, 5)
    np.testing.assert_allclose(layer(x), clone(x), 1e-6)  # same seed


def test_save_weights_and_load_weights_restore_params_and_state(tmp_path):
    def model_with(seed):
        layer = FlaxLayer(modules.BatchNormDropout(), seed=seed)
        return keras.Sequential([keras.Input((5,)), layer]), layer

    model, layer = model_with(0)
    model.compile("adam", "mse")
    model.fit(data(32, 5), data(32, 2), epochs=2, verbose=0)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    fresh, fresh_layer = model_with(1)
    fresh.load_weights(path)
    for a, b in zip(
        jax.tree.leaves(layer.flax_variables),
        jax.tree.leaves(fresh_layer.flax_variables),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    x = data(4, 5)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), fresh.predict(x, verbose=0)
    )


def test_keras_file_round_trip_of_the_docs_cnn(tmp_path):
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, FlaxLayer(modules.CNN(), seed=0)(inputs))
    path = str(tmp_path / "cnn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = data(4, 8, 8, 1)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )


def test_module_fields_of_every_kind_round_trip():
    import functools

    import jax.numpy as jnp

    module = modules.Configured(
        features=6,
        act=nn.gelu,
        dtype=jnp.bfloat16,
        kernel_init=nn.initializers.zeros,
        norm=functools.partial(nn.BatchNorm, momentum=0.5),
        head=modules.MLP(features=(5, 2)),
        sizes=(4,),
    )
    layer = FlaxLayer(module, seed=0)
    x = data(3, 5)
    out = layer(x)
    clone = FlaxLayer.from_config(layer.get_config())
    norm = clone.module.norm
    assert (norm.func, norm.args, norm.keywords) == (
        nn.BatchNorm,
        (),
        {"momentum": 0.5},
    )
    assert clone.module.clone(norm=module.norm) == module
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x), out)


def test_configs_name_public_import_paths_and_old_private_ones_load():
    module = modules.Configured(
        act=nn.gelu, kernel_init=nn.initializers.normal(0.02)
    )
    config = FlaxLayer(module).get_config()
    fields = config["module"]["config"]
    assert fields["act"]["path"] == "jax.nn:gelu"
    assert fields["kernel_init"]["factory"] == "jax.nn.initializers:normal"
    assert "_src" not in json.dumps(config)
    # A file written when configs named JAX's private modules.
    old = json.loads(
        json.dumps(config)
        .replace("jax.nn:gelu", "jax._src.nn.functions:gelu")
        .replace("jax.nn.initializers:", "jax._src.nn.initializers:")
    )
    assert FlaxLayer.from_config(old).get_config() == config
