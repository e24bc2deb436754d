"""EquinoxLayer against Equinox itself: `jax.vmap` of the module in
inference, Equinox's BatchNorm example in training, and a hand-written
`eqx.filter_value_and_grad` + Optax loop for `fit`."""

import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx

from keras_flax import EquinoxLayer
from keras_flax import OptaxOptimizer
from keras_flax import _private
from tests.conftest import data
from tests.conftest import onnx_outputs

KEY = jax.random.PRNGKey(0)


class ConvNet(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 4, 3, key=k1)  # channels first
        self.head = eqx.nn.Linear(4 * 4 * 4, 3, key=k2)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.conv(x)).reshape(-1))


class Attention(eqx.Module):
    attention: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attention = eqx.nn.MultiheadAttention(2, 8, key=k1)
        self.head = eqx.nn.Linear(8, 2, key=k2)

    def __call__(self, x):
        return self.head(self.attention(x, x, x).mean(axis=0))


class BatchNormNet(eqx.Module):
    """Equinox's BatchNorm example: a stateful module, per example."""

    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(5, 6, key=k1)
        self.norm = eqx.nn.BatchNorm(6, axis_name="batch", mode="batch")
        self.dropout = eqx.nn.Dropout(0.5)
        self.head = eqx.nn.Linear(6, 2, key=k2)

    def __call__(self, x, state, *, key=None):
        x, state = self.norm(jax.nn.relu(self.linear(x)), state)
        return self.head(self.dropout(x, key=key)), state


def _mlp():
    return eqx.nn.MLP(5, 2, 16, 2, key=KEY)


# name: (module factory, input shape)
MODELS = {
    "mlp": (_mlp, (5,)),
    "conv2d": (lambda: ConvNet(KEY), (1, 6, 6)),
    "attention": (lambda: Attention(KEY), (4, 8)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inference_equals_vmap_of_the_module(name):
    make, shape = MODELS[name]
    module = make()
    x = data(3, *shape)
    layer = EquinoxLayer(module)
    np.testing.assert_allclose(
        layer(x), jax.vmap(module)(x), rtol=1e-5, atol=1e-6
    )
    # Named by tree path; the parameters are the module's inexact arrays.
    params = jax.tree_util.tree_leaves(eqx.filter(module, eqx.is_inexact_array))
    assert len(layer.trainable_weights) == len(params)
    assert layer.count_params() == sum(p.size for p in params)


def test_mlp_weights_are_named_by_tree_path():
    layer = EquinoxLayer(_mlp(), name="mlp")
    layer(data(2, 5))
    assert sorted(w.path for w in layer.weights) == [
        f"mlp/layers/{i}/{kind}"
        for i in range(3)
        for kind in ("bias", "weight")
    ]


def _arrays(module):
    return eqx.filter(module, eqx.is_inexact_array)


def _hand_written_fit(module, x, y, tx, steps):
    """`eqx.filter_value_and_grad` + Optax, the whole batch per step."""
    opt_state = tx.init(eqx.filter(module, eqx.is_inexact_array))

    @eqx.filter_value_and_grad
    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    for _ in range(steps):
        _, grads = loss(module, x, y)
        updates, opt_state = tx.update(grads, opt_state, module)
        module = eqx.apply_updates(module, updates)
    return module


def test_fit_equals_a_hand_written_equinox_and_optax_loop():
    x, y = data(16, 5), data(16, 2, seed=1)
    layer = EquinoxLayer(_mlp())
    inputs = keras.Input((5,))
    model = keras.Model(inputs, layer(inputs))
    model.compile(OptaxOptimizer(optax.adam(1e-2)), "mse")
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    expected = _hand_written_fit(_mlp(), x, y, optax.adam(1e-2), 3)
    got = jax.tree_util.tree_leaves(_arrays(layer.module))
    want = jax.tree_util.tree_leaves(_arrays(expected))
    assert len(got) == len(want) == 6
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The trained module moved from the initial one.
    first = jax.tree_util.tree_leaves(_arrays(_mlp()))[0]
    assert not np.allclose(got[0], first)


def test_batchnorm_state_updates_as_in_equinox_and_inference_uses_it():
    module, state = eqx.nn.make_with_state(BatchNormNet)(KEY)
    layer = EquinoxLayer(module, state=state, seed=0, name="bn")
    x = data(8, 5)
    layer(x)
    assert sorted(w.path for w in layer.non_trainable_weights) == [
        "bn/state/norm/batch_counter",
        "bn/state/norm/batch_state_index/0",
        "bn/state/norm/batch_state_index/1",
    ]
    # Training: Equinox's example, `vmap` with the state unbatched. The
    # dropout mask depends on the key, so dropout is off (same graph).
    no_dropout = eqx.tree_at(lambda m: m.dropout, module, eqx.nn.Dropout(0.0))
    plain = EquinoxLayer(no_dropout, state=state, name="plain")
    out = plain(x, training=True)
    want, new_state = jax.vmap(
        no_dropout, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(
        jax.tree_util.tree_leaves(plain.eqx_state),
        jax.tree_util.tree_leaves(new_state),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Inference: the updated statistics, in inference mode.
    inference = eqx.nn.inference_mode(plain.module)
    want, _ = jax.vmap(
        inference, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, plain.eqx_state)
    np.testing.assert_allclose(plain(x), want, rtol=1e-5, atol=1e-6)


def test_dropout_key_is_fresh_each_step_and_off_in_inference():
    module, state = eqx.nn.make_with_state(BatchNormNet)(KEY)
    layer = EquinoxLayer(module, state=state, seed=0)
    x = data(8, 5)
    first = np.asarray(layer(x, training=True))
    second = np.asarray(layer(x, training=True))
    assert not np.allclose(first, second)
    # Reproducible from the seed.
    again = EquinoxLayer(module, state=state, seed=0)
    np.testing.assert_allclose(again(x, training=True), first, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(layer(x)))


def test_batched_hands_the_method_the_whole_batch():
    module = _mlp()
    x = data(4, 5)

    def on_batch(module, batch):
        assert batch.shape[0] == 4  # the whole batch, not one example
        return jax.vmap(module)(batch) * 2

    layer = EquinoxLayer(module, method=on_batch, batched=True)
    # Compiled, as the layer runs it: the same program, the same bits.
    np.testing.assert_array_equal(layer(x), eqx.filter_jit(on_batch)(module, x))


def test_wrt_trains_only_the_chosen_parameters():
    x, y = data(16, 5), data(16, 2, seed=1)
    layer = EquinoxLayer(_mlp(), wrt=nnx.PathContains("2"), name="mlp")
    inputs = keras.Input((5,))
    model = keras.Model(inputs, layer(inputs))
    assert sorted(w.path for w in layer.trainable_weights) == [
        "mlp/layers/2/bias",
        "mlp/layers/2/weight",
    ]
    model.compile(OptaxOptimizer(optax.sgd(0.1)), "mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    trained, initial = layer.module, _mlp()
    np.testing.assert_array_equal(
        trained.layers[0].weight, initial.layers[0].weight
    )
    assert not np.allclose(trained.layers[2].weight, initial.layers[2].weight)


def test_from_constructor_saves_and_loads_a_stateful_model(tmp_path):
    layer = EquinoxLayer.from_constructor(
        BatchNormNet, KEY, layer_kwargs={"seed": 0}
    )
    inputs = keras.Input((5,))
    model = keras.Model(inputs, layer(inputs))
    model.compile("adam", "mse")
    x = data(16, 5)
    model.fit(x, data(16, 2, seed=1), batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


@pytest.mark.slow  # a jax2onnx conversion
def test_onnx_export_serves_what_predict_returns(tmp_path):
    """The MLP's activation (`jax.nn.relu`, kept as a field) has a custom
    derivative calling a jitted function, which jax2onnx 0.17.1 cannot
    lower on JAX 0.12: refused there, nothing written; served elsewhere."""
    inputs = keras.Input((5,))
    model = keras.Model(inputs, EquinoxLayer(_mlp(), name="mlp")(inputs))
    x = data(3, 5)
    model(x)
    path = tmp_path / "m.onnx"
    if _private.jax2onnx_lowers_nested_jit():
        out = onnx_outputs(model, x, path)
        np.testing.assert_allclose(out, model.predict(x, verbose=0), 1e-5, 1e-5)
    else:
        _assert_refused_nothing_written(model, path)


def _assert_refused_nothing_written(model, path):
    with pytest.raises(NotImplementedError) as refused:
        model.export(str(path), format="onnx", verbose=False)
    message = str(refused.value)
    assert "Layer 'mlp' cannot be exported to ONNX with jax2onnx" in message
    assert f"on JAX {jax.__version__}" in message
    assert "export_stablehlo" in message
    assert not path.exists()


@pytest.mark.slow  # a jax2onnx conversion
def test_onnx_export_refuses_what_jax2onnx_cannot_lower(tmp_path, monkeypatch):
    """The refusal itself, on every JAX: where jax2onnx cannot lower a
    jitted function inside a custom derivative, a program holding one is
    refused before anything is written."""
    monkeypatch.setattr(_private, "jax2onnx_lowers_nested_jit", lambda: False)

    @jax.custom_jvp
    @jax.jit
    def activation(x):
        return jnp.maximum(x, 0.0)

    activation.defjvp(
        lambda primals, tangents: (activation(*primals), *tangents)
    )
    module = eqx.nn.MLP(5, 2, 8, 1, activation=activation, key=KEY)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, EquinoxLayer(module, name="mlp")(inputs))
    model(data(3, 5))
    _assert_refused_nothing_written(model, tmp_path / "m.onnx")


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"must be an equinox.Module instance"):
        EquinoxLayer(keras.layers.Dense(2))
    with pytest.raises(TypeError, match=r"from_constructor\(BatchNormNet"):
        EquinoxLayer(BatchNormNet)
    module, _ = eqx.nn.make_with_state(BatchNormNet)(KEY)
    with pytest.raises(ValueError, match=r"make_with_state\(BatchNormNet\)"):
        EquinoxLayer(module)
    with pytest.raises(ValueError, match=r"no method of MLP.*'__call__'"):
        EquinoxLayer(_mlp(), method="forward")
    with pytest.raises(TypeError, match=r"equinox.Module class"):
        EquinoxLayer.from_constructor(eqx.nn.Linear(2, 2, key=KEY))


def test_a_module_of_the_other_layer_names_that_layer():
    import flax.linen as nn

    from keras_flax import FlaxLayer

    for flax_module in (nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nn.Dense(3)):
        with pytest.raises(TypeError, match=r"which FlaxLayer wraps.*Fix: `Fl"):
            EquinoxLayer(flax_module)
    with pytest.raises(TypeError, match=r"which EquinoxLayer wraps.*Fix: `Eq"):
        FlaxLayer(eqx.nn.Linear(2, 3, key=KEY))


def test_a_method_with_an_argument_nothing_fills_is_refused_at_once():
    linear = eqx.nn.Linear(3, 2, key=KEY)

    def with_mask(module, x, mask):
        return module(x) * mask

    with pytest.raises(ValueError, match=r"required argument `mask`.*Fix"):
        EquinoxLayer(linear, method=with_mask)

    class Masked(eqx.nn.Linear):
        def masked(self, x, mask):
            return self(x) * mask

    masked = Masked(3, 2, key=KEY)
    with pytest.raises(ValueError, match=r"required argument `mask`"):
        EquinoxLayer(masked, method="masked")

    # Defaults, `key` and `state` are filled: accepted, and equal Equinox.
    def with_default(module, x, mask=2.0, *, key=None):
        return module(x) * mask

    layer = EquinoxLayer(linear, method=with_default)
    x = data(4, 3)
    np.testing.assert_allclose(
        layer(x), jax.vmap(lambda v: linear(v) * 2.0)(x), rtol=1e-6
    )


def test_without_equinox_the_layer_names_the_extra(monkeypatch):
    import keras_flax

    # As if equinox were not installed: the adapter file cannot import.
    monkeypatch.setitem(sys.modules, "keras_flax._equinox", None)
    monkeypatch.delattr(keras_flax, "_equinox")
    with pytest.raises(ImportError, match=r"keras-flax\[equinox\]"):
        EquinoxLayer(_mlp())


def test_saving_a_module_built_outside_the_layer_names_from_constructor():
    layer = EquinoxLayer(_mlp())
    with pytest.raises(TypeError, match=r"from_constructor\(MLP"):
        layer.get_config()


@pytest.mark.slow
def test_importing_keras_flax_does_not_import_equinox():
    code = "import keras_flax, sys; print('equinox' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    assert out.stdout.strip() == "False"
