"""RNG streams: fresh keys every training step, seeds, inference RNGs."""

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import FlaxLayer
from tests import modules
from tests.conftest import data


def _dropout_model(seed=0):
    layer = FlaxLayer(modules.DropoutOnly(), seed=seed)
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile(keras.optimizers.SGD(learning_rate=0.0), "mse")
    return model, layer


def test_dropout_masks_differ_between_steps_of_the_jitted_train_step():
    model, _ = _dropout_model()
    x, y = np.ones((16, 8), "float32"), np.zeros((16, 32), "float32")
    # With a zero learning rate the weights stay put: the losses of two
    # steps on one batch differ only through their dropout masks.
    losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
    assert len(set(losses)) == 3


def test_seed_state_advances_once_per_fit_step_and_not_in_predict():
    model, layer = _dropout_model()
    x, y = np.ones((32, 8), "float32"), np.zeros((32, 32), "float32")
    start = np.asarray(layer.seed_generator.state.value)
    model.predict(x, verbose=0)
    np.testing.assert_array_equal(layer.seed_generator.state.value, start)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    steps = np.asarray(layer.seed_generator.state.value) - start
    assert steps.tolist() == [0, 4]


def test_stateless_train_step_is_traced_once_and_draws_new_masks():
    layer = FlaxLayer(modules.DropoutOnly(), seed=0)
    x = jnp.ones((4, 8))
    layer(x)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    traces = []

    @jax.jit
    def step(non_trainable):
        traces.append(1)  # runs once per trace
        return layer.stateless_call(trainable, non_trainable, x, training=True)

    out1, non_trainable = step(non_trainable)
    out2, non_trainable = step(non_trainable)
    assert len(traces) == 1
    assert not np.array_equal(out1 == 0, out2 == 0)


def test_predict_is_deterministic_and_equals_flax_inference():
    model, layer = _dropout_model()
    x = data(8, 8)
    first = model.predict(x, verbose=0)
    np.testing.assert_array_equal(first, model.predict(x, verbose=0))
    want = modules.DropoutOnly().apply(layer.flax_variables, x, training=False)
    np.testing.assert_allclose(first, want, 1e-6, 1e-6)


def test_module_drawing_its_own_stream_in_training_and_inference():
    layer = FlaxLayer(modules.Noisy(), seed=0)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile("adam", "mse")
    model.fit(data(16, 3), data(16, 4), epochs=1, verbose=0)
    x = data(2000, 3)
    a, b = model.predict(x, verbose=0), model.predict(x, verbose=0)
    assert not np.allclose(a, b)  # fresh noise at each call
    variables = layer.flax_variables
    dense = x @ variables["params"]["Dense_0"]["kernel"]
    noise = a - (dense + variables["params"]["Dense_0"]["bias"])
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def _train_run(seed):
    layer = FlaxLayer(modules.BatchNormDropout(), seed=seed)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    initial = layer.flax_variables
    model.fit(
        data(32, 5),
        data(32, 2),
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    return initial, layer.flax_variables


def test_same_seed_gives_identical_weights_and_training_runs():
    init_a, final_a = _train_run(seed=7)
    init_b, final_b = _train_run(seed=7)
    for a, b in zip(
        jax.tree.leaves(init_a), jax.tree.leaves(init_b), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(final_a), jax.tree.leaves(final_b), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    init_c, _ = _train_run(seed=8)
    kernel = ("params", "Dense_0", "kernel")
    assert not np.array_equal(
        init_a[kernel[0]][kernel[1]][kernel[2]],
        init_c[kernel[0]][kernel[1]][kernel[2]],
    )


def test_keras_global_seed_makes_unseeded_layers_reproducible():
    def initial_kernel():
        keras.utils.set_random_seed(3)
        layer = FlaxLayer(modules.MLP())
        layer(data(2, 4))
        return np.asarray(layer.flax_variables["params"]["Dense_0"]["kernel"])

    np.testing.assert_array_equal(initial_kernel(), initial_kernel())
