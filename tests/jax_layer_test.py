"""JaxLayer on JAX functions and Haiku, against the functions themselves."""

import itertools

import haiku as hk
import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import JaxLayer
from keras_flax import _backends
from tests import modules
from tests.conftest import assert_trees_close
from tests.conftest import data


def _values(tree):
    return jax.tree.map(lambda v: v.value, tree)


def test_stateless_pair_outputs_gradients_and_names():
    layer = JaxLayer(modules.dense_call, modules.dense_init, seed=0)
    x = data(4, 5)
    out = layer(x)
    params = _values(layer.params)
    np.testing.assert_allclose(out, modules.dense_call(params, x), 1e-6, 1e-6)
    assert sorted(w.path for w in layer.weights) == [
        "jax_layer/dense/b",
        "jax_layer/dense/w",
    ]
    trainable = [v.value for v in layer.trainable_variables]

    def keras_loss(trainable):
        y, _ = layer.stateless_call(trainable, [], x)
        return jnp.sum(y**2)

    def jax_loss(params):
        return jnp.sum(modules.dense_call(params, x) ** 2)

    got = jax.grad(keras_loss)(trainable)
    want = jax.tree.leaves(jax.grad(jax_loss)(params))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, 1e-5, 1e-6)


def test_stateful_pair_updates_state_with_the_drawn_rng():
    layer = JaxLayer(modules.stateful_call, modules.stateful_init, seed=0)
    x = data(6, 5)
    layer(x)  # build
    params, state = _values(layer.params), _values(layer.state)
    rng = np.asarray(layer.seed_generator.state.value)  # the next seed
    out = layer(x, training=True)
    want_out, want_state = modules.stateful_call(params, state, rng, x, True)
    np.testing.assert_allclose(out, want_out, 1e-6, 1e-6)
    assert_trees_close(_values(layer.state), want_state)
    assert sorted(w.path for w in layer.non_trainable_weights) == [
        "jax_layer/state/mean",
        "jax_layer/state/steps",
    ]


def test_inference_passes_no_rng_and_leaves_state_alone():
    seen = []

    def call_fn(params, state, rng, inputs, training):
        seen.append(rng)
        return modules.stateful_call(params, state, rng, inputs, training)

    layer = JaxLayer(call_fn, modules.stateful_init, seed=0)
    x = data(3, 5)
    layer(x)
    state = _values(layer.state)
    layer(x, training=False)
    assert seen[-1] is None
    assert_trees_close(_values(layer.state), state, 0, 0)


def test_fit_trains_a_stateful_pair():
    layer = JaxLayer(modules.stateful_call, modules.stateful_init, seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = data(64, 5), data(64, 3, seed=1) * 0.1
    history = model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert int(layer.state["steps"].value) == 20


def test_params_given_without_init_fn():
    params = modules.dense_init(jax.random.key(1), jnp.ones((1, 5)))
    layer = JaxLayer(modules.dense_call, params=params)
    x = data(2, 5)
    np.testing.assert_allclose(layer(x), modules.dense_call(params, x), 1e-6)


def _haiku_net(inputs, training):
    x = hk.Linear(8)(inputs)
    x = hk.BatchNorm(True, True, 0.9)(x, is_training=training)
    if training:
        x = hk.dropout(hk.next_rng_key(), 0.5, x)
    return hk.Linear(2)(x)


def test_haiku_transform_with_state_pair():
    net = hk.transform_with_state(_haiku_net)
    layer = JaxLayer(call_fn=net.apply, init_fn=net.init, seed=0)
    x = data(8, 4)
    layer(x)
    params, state = _values(layer.params), _values(layer.state)
    want, _ = net.apply(params, state, None, x, False)
    np.testing.assert_allclose(layer(x), want, 1e-5, 1e-6)

    rng = np.asarray(layer.seed_generator.state.value)
    out = layer(x, training=True)
    want, want_state = net.apply(params, state, rng, x, True)
    np.testing.assert_allclose(out, want, 1e-5, 1e-6)
    assert_trees_close(_values(layer.state), want_state)

    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile("adam", "mse")
    model.fit(data(32, 4), data(32, 2), epochs=1, verbose=0)


def test_rng_without_training_argument_gets_a_key_in_fit_only():
    def call_fn(params, rng, inputs):
        y = modules.dense_call(params, inputs)
        if rng is None:
            return y
        return jnp.where(jax.random.bernoulli(rng, 0.5, y.shape), y, 0.0)

    layer = JaxLayer(call_fn, modules.dense_init, seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = data(16, 5), data(16, 3)
    losses = {float(model.train_on_batch(x, y)) for _ in range(3)}
    assert len(losses) == 3  # a fresh key at every step
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_unknown_dimensions_are_named_without_running_out():
    names = list(itertools.islice(_backends.dimension_names(), 702))
    assert len(set(names)) == 702 and "b" not in names  # "b": the batch
    assert names[:3] == ["a", "c", "d"] and names[25] == "aa"
    assert all(name.isidentifier() for name in names)


def test_inputs_with_symbolic_sizes_pass_the_input_check():
    layer = JaxLayer(modules.dense_call, modules.dense_init, seed=0)
    layer(data(2, 5))
    (batch,) = jax.export.symbolic_shape("b")
    out = jax.eval_shape(layer, jax.ShapeDtypeStruct((batch, 5), "float32"))
    assert out.shape == (batch, 3)
