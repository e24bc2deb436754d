"""Code written for keras.layers.FlaxLayer / JaxLayer runs unchanged."""

import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import keras_flax
from tests import modules
from tests.conftest import assert_trees_close
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


@pytest.mark.parametrize("JaxLayer", JAX_LAYERS, ids=IDS)
def test_stateful_call_fn_on_a_layer_holding_no_state(JaxLayer):
    w = data(3, 2)
    layer = JaxLayer(modules.stateless_call_with_state, params={"w": w})
    x = data(4, 3, seed=1)
    np.testing.assert_allclose(layer(x), x @ w, 1e-6)  # outputs, no pair
    assert layer.state is None


def test_stateful_call_fn_whose_init_fn_returns_no_state_trains():
    layer = keras_flax.JaxLayer(
        modules.stateless_call_with_state, modules.stateless_init, seed=0
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    x, y = data(8, 3), data(8, 2, seed=1)
    w = np.asarray(layer.params["w"].value)
    np.testing.assert_allclose(model.predict(x, verbose=0), x @ w, 1e-6)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    grad = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
    np.testing.assert_allclose(layer.params["w"].value, w - 0.1 * grad, 1e-5)
    assert layer.state is None


@pytest.mark.parametrize("JaxLayer", JAX_LAYERS, ids=IDS)
def test_a_new_state_the_layer_has_no_room_for_is_refused(JaxLayer):
    layer = JaxLayer(modules.call_returning_new_state, params={"w": data(3, 2)})
    with pytest.raises(ValueError) as error:
        layer(data(4, 3))
    if JaxLayer is keras_flax.JaxLayer:
        assert re.search(
            r"`call_fn` returned a new state, but the layer holds no state.*"
            r"Received: a new state with leaves count\. Give the layer its "
            r"initial state \(`state=\.\.\.`",
            str(error.value),
        )
    fixed = JaxLayer(
        modules.call_returning_new_state,
        params={"w": data(3, 2)},
        state={"count": np.zeros((), "float32")},
    )
    assert fixed(data(4, 3)).shape == (4, 2)


def test_init_fn_gets_the_batch_size_build_is_given():
    shapes = []

    def init_fn(rng, inputs):
        shapes.append(inputs.shape)
        return modules.dense_init(rng, inputs)

    keras_flax.JaxLayer(modules.dense_call, init_fn)(data(5, 4))
    keras_flax.JaxLayer(modules.dense_call, init_fn)(keras.Input((4,)))
    keras_flax.JaxLayer(modules.dense_call, init_fn).build((6, 4))
    assert shapes == [(5, 4), (1, 4), (6, 4)]


def _encoder_only_sgd(module, variables, x, y, lr):
    """One `optax.sgd` step on the encoder's parameters alone."""
    params = variables["params"]

    def loss(encoder):
        v = {**variables, "params": {**params, "encoder": encoder}}
        out = module.apply(v, x, method="embed")
        return jnp.mean((out - y) ** 2)

    sgd = optax.sgd(lr)
    grads = jax.grad(loss)(params["encoder"])
    updates, _ = sgd.update(grads, sgd.init(params["encoder"]))
    return optax.apply_updates(params["encoder"], updates)


@pytest.mark.parametrize("pack_weights", [False, True], ids=["one", "packed"])
def test_a_pretrained_models_variables_with_one_of_its_methods(
    pack_weights, tmp_path
):
    module = modules.EncoderHead()
    x, y = data(8, 5), data(8, 4, seed=1)
    variables = module.init(jax.random.key(0), x)
    layer = keras_flax.FlaxLayer(
        module, "embed", variables, pack_weights=pack_weights
    )
    model = keras.Sequential([keras.Input((5,)), layer])
    want = module.apply(variables, x, method="embed")
    np.testing.assert_allclose(model.predict(x, verbose=0), want, 1e-5, 1e-6)
    # The encoder trains; the head (4x2 + 2, norm 2 + 2) and its batch
    # statistics (2 + 2) are kept as non-trainable weights.
    assert count(layer.trainable_weights) == 5 * 4 + 4
    assert count(layer.non_trainable_weights) == 8 + 2 + 4 + 4

    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    trained = layer.flax_variables
    assert_trees_close(
        trained["params"]["encoder"],
        _encoder_only_sgd(module, variables, x, y, 0.1),
    )
    # Weight decay would move them if any optimizer touched them.
    model.compile(keras.optimizers.AdamW(0.1, weight_decay=0.5), "mse")
    model.fit(x, y, epochs=2, verbose=0)
    trained = layer.flax_variables
    for name in ("head", "head_norm"):
        assert_trees_equal(trained["params"][name], variables["params"][name])
    assert_trees_equal(trained["batch_stats"], variables["batch_stats"])
    assert not np.array_equal(
        trained["params"]["encoder"]["kernel"],
        variables["params"]["encoder"]["kernel"],
    )

    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    assert_trees_equal(loaded.layers[0].flax_variables, trained)
    assert count(loaded.layers[0].non_trainable_weights) == 18


def test_jax_layer_params_with_leaves_init_fn_does_not_create():
    params = modules.dense_init(jax.random.key(0), data(1, 5))
    params = {**params, "unused": {"w": data(5, 5)}}
    layer = keras_flax.JaxLayer(modules.dense_call, modules.dense_init, params)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.AdamW(0.1, weight_decay=0.5), "mse")
    model.fit(data(8, 5), data(8, 3, seed=1), verbose=0)
    assert not layer.params["unused"]["w"].trainable
    assert layer.params["dense"]["w"].trainable
    np.testing.assert_array_equal(
        layer.params["unused"]["w"].value, params["unused"]["w"]
    )


def count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def assert_trees_equal(a, b):
    a_leaves, a_def = jax.tree_util.tree_flatten(a)
    b_leaves, b_def = jax.tree_util.tree_flatten(b)
    assert a_def == b_def, f"{a_def} != {b_def}"
    for x, y in zip(a_leaves, b_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _public(layer):
    return {a for a in dir(layer) if not a.startswith("_")}


# jax2tf's per-mode functions: ours are converted per input structure, with
# another signature (see `_backends._TensorFlowRunner`), so not exposed.
_NOT_EXPOSED = {"jax2tf_training_false_fn", "jax2tf_training_true_fn"}


@pytest.mark.parametrize("module", ["MLP", "BatchNormDropout"])
def test_flax_layer_has_the_builtins_public_attributes(module):
    module = getattr(modules, module)()
    x = data(4, 5)
    variables = module.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x
    )
    builtin = keras.layers.FlaxLayer(module, variables=variables)
    ours = keras_flax.FlaxLayer(module, variables=variables)
    builtin(x), ours(x)
    assert _public(builtin) - _public(ours) == _NOT_EXPOSED
    for name in ("call_fn_has_params", "call_fn_has_state"):
        assert getattr(ours, name) == getattr(builtin, name)
    for name in ("call_fn_arguments", "init_fn_arguments"):
        assert list(getattr(ours, name)) == list(getattr(builtin, name))
    for name in ("tracked_params", "tracked_state"):
        # The same variables, by shape, in the same (leaf) order.
        assert [v.shape for v in getattr(ours, name)] == [
            v.shape for v in getattr(builtin, name)
        ]
        assert all(
            any(v is w for w in ours.weights) for v in getattr(ours, name)
        )


def test_jax_layer_has_the_builtins_public_attributes():
    def call_fn(params, inputs):
        return inputs @ params["w"]

    params = {"w": jnp.ones((5, 3))}
    builtin = keras.layers.JaxLayer(call_fn, params=params)
    ours = keras_flax.JaxLayer(call_fn, params=params)
    x = data(2, 5)
    builtin(x), ours(x)
    assert _public(builtin) - _public(ours) == _NOT_EXPOSED
    assert ours.tracked_params == [ours.params["w"]]
    assert ours.tracked_state == [] and len(builtin.tracked_state) == 0
