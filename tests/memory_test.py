"""One copy of each weight (SPEC 13.1) and a module's own dtypes (13.3).

Live device bytes (`jax.live_arrays()`) are measured as the growth over
what was live before, against the parameters' own bytes.
"""

import gc

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx

import keras_flax
from keras_flax import FlaxLayer

DIM, DEPTH = 256, 4


class LinenMLP(nn.Module):
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        for _ in range(DEPTH):
            x = nn.relu(nn.Dense(DIM, param_dtype=self.param_dtype)(x))
        return x


class NNXMLP(nnx.Module):
    def __init__(self, rngs, param_dtype=jnp.float32, lora_rank=None):
        self.layers = nnx.List(
            [
                nnx.LoRALinear(DIM, DIM, lora_rank=lora_rank, rngs=rngs)
                if lora_rank
                else nnx.Linear(DIM, DIM, param_dtype=param_dtype, rngs=rngs)
                for _ in range(DEPTH)
            ]
        )

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return x


PARAM_BYTES = DEPTH * (DIM * DIM + DIM) * 4


def live_bytes():
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def data():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(16, DIM)).astype("float32"),
        rng.normal(size=(16, DIM)).astype("float32"),
    )


def make_layer(kind):
    if kind == "nnx":
        return FlaxLayer(NNXMLP(nnx.Rngs(0)))
    if kind == "linen_init":
        return FlaxLayer(LinenMLP(), seed=0)
    variables = LinenMLP().init(jax.random.key(0), jnp.ones((1, DIM)))
    layer = FlaxLayer(LinenMLP(), variables=variables)
    del variables  # the user lets go of theirs: only the layer's remain
    return layer


def fitted(layer, optimizer):
    model = keras.Sequential([keras.Input((DIM,)), layer])
    model.compile(optimizer, "mse")
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return model


KINDS = ["linen_given", "linen_init", "nnx"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_copy_after_build(kind):
    base = live_bytes()
    layer = make_layer(kind)
    layer(np.zeros((1, DIM), "float32"))
    ratio = (live_bytes() - base) / PARAM_BYTES
    assert 0.99 < ratio < 1.02, ratio


@pytest.mark.parametrize("optimizer", ["keras_adam", "optax_adam"])
@pytest.mark.parametrize("kind", KINDS)
def test_after_fit_parameters_and_adam_state_only(kind, optimizer):
    """3.00x: the parameters and Adam's two moments, as in a hand-written
    `jax.jit` + Optax loop."""
    base = live_bytes()
    layer = make_layer(kind)
    if optimizer == "keras_adam":
        opt = keras.optimizers.Adam(1e-3)
    else:
        opt = keras_flax.OptaxOptimizer(optax.adam, learning_rate=1e-3)
    model = fitted(layer, opt)
    ratio = (live_bytes() - base) / PARAM_BYTES
    assert 2.99 < ratio < 3.05, ratio
    del model


def test_hand_written_optax_loop_holds_the_same():
    """The figure the layer is held to, measured the same way."""
    base = live_bytes()
    params = LinenMLP().init(jax.random.key(0), jnp.ones((1, DIM)))["params"]
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            return jnp.mean((LinenMLP().apply({"params": p}, x) - y) ** 2)

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x, y = data()
    for i in range(2):
        params, opt_state = step(params, opt_state, x[i::2], y[i::2])
    ratio = (live_bytes() - base) / PARAM_BYTES
    assert 2.99 < ratio < 3.05, ratio


def test_nnx_module_shares_the_trained_arrays():
    module = NNXMLP(nnx.Rngs(0))
    layer = FlaxLayer(module)
    fitted(layer, keras.optimizers.Adam(1e-2))
    kernel = layer.module.layers[0].kernel.get_value()
    variable = next(v for v in layer.weights if v.path.endswith("0/kernel"))
    assert kernel is variable.value  # the very array, no second copy
    x, _ = data()
    np.testing.assert_allclose(
        np.asarray(module(x)), np.asarray(layer(x)), rtol=1e-6, atol=1e-6
    )


def test_given_linen_arrays_stay_valid_after_fit():
    variables = LinenMLP().init(jax.random.key(0), jnp.ones((1, DIM)))
    before = jax.tree_util.tree_map(np.array, variables)
    layer = FlaxLayer(LinenMLP(), variables=variables)
    fitted(layer, keras.optimizers.Adam(1e-2))
    for now, was in zip(
        jax.tree_util.tree_leaves(variables),
        jax.tree_util.tree_leaves(before),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(now), was)


def test_frozen_base_holds_no_optimizer_state():
    """LoRA on a base: base + adapters + the adapters' Adam moments."""
    base = live_bytes()
    layer = FlaxLayer(NNXMLP(nnx.Rngs(0), lora_rank=4), wrt=nnx.LoRAParam)
    model = fitted(layer, keras.optimizers.Adam(1e-3))
    adapters = sum(
        np.asarray(v.value).nbytes for v in layer.trainable_variables
    )
    assert 0 < adapters < PARAM_BYTES / 10
    expected = PARAM_BYTES + 3 * adapters
    ratio = (live_bytes() - base) / expected
    assert 0.99 < ratio < 1.03, ratio
    del model


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_param_dtype_bfloat16_is_kept(kind):
    base = live_bytes()
    if kind == "nnx":
        layer = FlaxLayer(NNXMLP(nnx.Rngs(0), param_dtype=jnp.bfloat16))
    else:
        layer = FlaxLayer(LinenMLP(param_dtype="bfloat16"), seed=0)
    x = np.ones((2, DIM), "float32")
    out = layer(x)
    assert {w.dtype for w in layer.weights} == {"bfloat16"}
    ratio = (live_bytes() - base) / (PARAM_BYTES / 2)
    assert 0.99 < ratio < 1.03, ratio
    # The same outputs as the plain module.
    if kind == "nnx":
        expected = layer.module(x)
    else:
        expected = LinenMLP(param_dtype="bfloat16").apply(
            layer.flax_variables, x
        )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_param_dtype_never_created_in_float32():
    """The init program itself creates bfloat16 arrays."""
    layer = FlaxLayer(LinenMLP(param_dtype="bfloat16"), seed=0)
    made = jax.eval_shape(
        lambda: LinenMLP(param_dtype="bfloat16").init(
            jax.random.key(0), jnp.ones((1, DIM))
        )
    )
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(made)} == {
        jnp.dtype("bfloat16")
    }
    layer(np.ones((1, DIM), "float32"))
    assert {w.dtype for w in layer.weights} == {"bfloat16"}


def test_explicit_dtype_policy_still_decides():
    layer = FlaxLayer(LinenMLP(param_dtype="bfloat16"), seed=0, dtype="float32")
    layer(np.ones((1, DIM), "float32"))
    assert {w.dtype for w in layer.weights} == {"float32"}
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = FlaxLayer(LinenMLP(), seed=0)
    out = layer(np.ones((1, DIM), "float32"))
    assert {w.dtype for w in layer.weights} == {"float32"}
    assert out.dtype == "bfloat16"


def test_bfloat16_layer_saves_and_loads_as_bfloat16(tmp_path):
    layer = FlaxLayer(LinenMLP(param_dtype="bfloat16"), seed=0)
    model = keras.Sequential([keras.Input((DIM,)), layer])
    x = np.ones((2, DIM), "float32")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert {w.dtype for w in loaded.weights} == {"bfloat16"}
    np.testing.assert_array_equal(
        np.asarray(loaded.predict(x, verbose=0)),
        np.asarray(model.predict(x, verbose=0)),
    )


def test_trainable_false_weight_holds_no_optimizer_state():
    base = live_bytes()
    layer = make_layer("linen_init")
    layer(np.zeros((1, DIM), "float32"))
    frozen = [v for v in layer.weights if v.path.endswith("Dense_0/kernel")]
    frozen[0].trainable = False
    model = fitted(layer, keras.optimizers.Adam(1e-3))
    expected = 3 * PARAM_BYTES - 2 * DIM * DIM * 4
    ratio = (live_bytes() - base) / expected
    assert 0.99 < ratio < 1.03, ratio
    del model


class ReadModule(keras.callbacks.Callback):
    """Reads the NNX module through the model after each batch."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.kernels = layer, []

    def on_train_batch_end(self, batch, logs=None):
        # Keras syncs its variables when a callback reads the model.
        assert self.model.layers[0] is self.layer
        kernel = self.layer.module.layers[0].kernel.get_value()
        self.kernels.append(np.array(kernel))


def test_nnx_module_follows_when_a_callback_reads_the_model():
    layer = FlaxLayer(NNXMLP(nnx.Rngs(0)))
    model = keras.Sequential([keras.Input((DIM,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = data()
    callback = ReadModule(layer)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    first, second = callback.kernels
    assert not np.array_equal(first, second)  # read mid-epoch, trained
    np.testing.assert_array_equal(
        second, np.asarray(layer.module.layers[0].kernel.get_value())
    )


def test_arrays_taken_from_the_module_before_fit_are_the_layers():
    module = NNXMLP(nnx.Rngs(0))
    layer = FlaxLayer(module)
    clone = nnx.clone(module)  # shares the arrays
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, jax.tree.map(lambda a: a.copy(), state))
    fitted(layer, keras.optimizers.Adam(1e-2))
    assert clone.layers[0].kernel.get_value().is_deleted()
    x, _ = data()
    assert not np.array_equal(np.asarray(copy(x)), np.asarray(module(x)))
