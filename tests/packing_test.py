"""`pack_weights=True`: one Keras variable per dtype, per-leaf views."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from tests import modules
from tests import nnx_modules
from tests.conftest import assert_trees_close
from tests.conftest import data


def _fitted(module, packed, x, y, optimizer="adam"):
    layer = FlaxLayer(module, seed=0, pack_weights=packed)
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    model.compile(optimizer, "mse")
    model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    return model, layer


def test_packed_training_equals_optax_and_unpacked_training():
    x, y = data(32, 5), data(32, 4, seed=1)
    module = modules.MLP()
    layer = FlaxLayer(module, seed=0, pack_weights=True)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    params = layer.flax_variables["params"]
    model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    assert len(layer.trainable_variables) == 1  # 4 leaves, one variable

    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(params)

    def loss(params, x, y):
        return jnp.mean((module.apply({"params": params}, x) - y) ** 2)

    for _ in range(2):
        for i in range(0, 32, 8):
            grads = jax.grad(loss)(params, x[i : i + 8], y[i : i + 8])
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
    assert_trees_close(layer.flax_variables["params"], params, 1e-4, 1e-6)

    # Batch statistics and dropout too: the same as without packing.
    x, y = data(32, 5), data(32, 2, seed=1)
    _, packed = _fitted(modules.BatchNormDropout(), True, x, y)
    _, plain = _fitted(modules.BatchNormDropout(), False, x, y)
    assert_trees_close(packed.flax_variables, plain.flax_variables, 1e-5)
    paths = [v.path.split("/", 2)[-1] for v in packed.weights]
    assert [p for p in paths if "seed" not in p] == [
        "packed/float32",
        "state/packed/float32",
    ]


def test_views_keep_flax_paths_and_write_through_to_the_pack():
    module = modules.MLP()
    layer = FlaxLayer(module, seed=0, pack_weights=True, name="mlp")
    x = data(3, 5)
    layer(x)
    kernel = layer.params["params"]["Dense_0"]["kernel"]
    assert kernel.path == "mlp/Dense_0/kernel"
    assert kernel.shape == (5, 16) and kernel.dtype == "float32"
    np.testing.assert_array_equal(
        np.asarray(kernel),
        layer.flax_variables["params"]["Dense_0"]["kernel"],
    )
    kernel.assign(np.zeros((5, 16), "float32"))
    variables = layer.flax_variables
    assert not np.asarray(variables["params"]["Dense_0"]["kernel"]).any()
    np.testing.assert_allclose(
        layer(x), module.apply(variables, x), rtol=1e-6, atol=1e-6
    )


def test_weights_files_are_the_same_packed_or_not(tmp_path):
    x, y = data(16, 5), data(16, 2, seed=1)
    saved = {}
    for packed in (False, True):
        model, _ = _fitted(modules.BatchNormDropout(), packed, x, y)
        model.save_weights(str(tmp_path / f"{packed}.weights.h5"))
        saved[packed] = model.predict(x, verbose=0)
    for packed in (False, True):
        layer = FlaxLayer(
            modules.BatchNormDropout(), seed=9, pack_weights=packed
        )
        model = keras.Sequential([keras.Input((5,)), layer])
        model.load_weights(str(tmp_path / f"{not packed}.weights.h5"))
        np.testing.assert_allclose(
            model.predict(x, verbose=0), saved[not packed], rtol=1e-6
        )


def test_keras_file_keeps_packing(tmp_path):
    x, y = data(16, 5), data(16, 2, seed=1)
    model, _ = _fitted(modules.BatchNormDropout(), True, x, y)
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    assert loaded.layers[0].pack_weights is True
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_packed_nnx_module_follows_training():
    x, y = data(8, 4), data(8, 2, seed=1)
    layer = FlaxLayer(nnx_modules.MLP(nnx.Rngs(0)), pack_weights=True)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, epochs=2, verbose=0)
    assert len(layer.trainable_variables) == 1
    np.testing.assert_allclose(
        layer.module(x), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_packed_under_mixed_precision_keeps_float32_weights():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = FlaxLayer(modules.MLP(), seed=0, pack_weights=True)
    out = layer(data(4, 5))
    assert layer.trainable_variables[0].dtype == "float32"
    assert out.dtype == jnp.bfloat16


def test_packing_is_refused_under_model_parallel_then_fixed():
    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1,), ["model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*Dense_0/kernel"] = (None, "model")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    try:
        layer = FlaxLayer(modules.MLP(), seed=0, pack_weights=True)
        with pytest.raises(ValueError, match="pack_weights=False"):
            layer(data(2, 5))
        layer = FlaxLayer(modules.MLP(), seed=0)
        assert layer(data(2, 5)).shape == (2, 4)
    finally:
        keras.distribution.set_distribution(None)


def test_pack_weights_must_be_a_bool():
    with pytest.raises(TypeError, match=r"pack_weights=True or"):
        FlaxLayer(modules.MLP(), pack_weights="yes")


def test_large_leaves_keep_variables_of_their_own(tmp_path):
    # The Dense kernel (160 x 128 values) is beyond what packing helps; the
    # small leaves share one pack. Training and files are as unpacked.
    x, y = data(32, 160), data(32, 4, seed=1)
    module = modules.MLP(features=(128, 4))
    model, packed = _fitted(module, True, x, y)
    _, plain = _fitted(module, False, x, y)
    by_path = {v.path.split("/", 2)[-1]: v for v in packed.trainable_weights}
    assert sorted(by_path) == ["Dense_0/kernel", "packed/float32"]
    kernel = packed.params["params"]["Dense_0"]["kernel"]
    assert kernel is by_path["Dense_0/kernel"]
    assert_trees_close(packed.flax_variables, plain.flax_variables, 1e-5)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    fresh = keras.Sequential(
        [keras.Input((160,)), FlaxLayer(module, seed=1, pack_weights=True)]
    )
    fresh.load_weights(path)
    assert_trees_close(
        fresh.layers[0].flax_variables, packed.flax_variables, 0, 0
    )
