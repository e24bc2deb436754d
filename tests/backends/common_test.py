"""The same behaviour on every backend, against plain Flax / JAX / optax.

Run once per backend (see conftest.py); ground truth is computed in JAX
from the layer's own initial variables.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx

from keras_flax import EquinoxLayer
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from tests import modules
from tests import nnx_modules
from tests.conftest import assert_trees_close
from tests.conftest import data

ROOT = pathlib.Path(__file__).resolve().parents[2]


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def _mse_sgd_reference(module, variables, batches, lr, **kwargs):
    """Plain `jax.grad` + `optax.sgd` over `batches`; returns the params."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params, x, y):
        out = module.apply({**rest, "params": params}, x, **kwargs)
        if "mutable" in kwargs:
            out, _ = out
        return jnp.mean((out - y) ** 2)

    params = variables["params"]
    optimizer = optax.sgd(lr)
    opt_state = optimizer.init(params)
    for x, y in batches:
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
    return params


def _sgd_model(module, features):
    layer = FlaxLayer(module, seed=0)
    model = keras.Sequential([keras.Input((features,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return layer, model


def test_fit_predict_evaluate_equal_plain_flax_and_optax():
    x, y = data(32, 5), data(32, 4, seed=1)
    module = modules.MLP()
    layer, model = _sgd_model(module, 5)
    initial = layer.flax_variables
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    want = _mse_sgd_reference(module, initial, batches, 0.1)
    assert_trees_close(layer.flax_variables["params"], want, rtol=1e-4)
    # Any batch size: the batch dimension is polymorphic.
    for n in (3, 32):
        np.testing.assert_allclose(
            model.predict(x[:n], verbose=0),
            module.apply({"params": want}, x[:n]),
            rtol=1e-5,
            atol=1e-6,
        )
    loss = model.evaluate(x, y, verbose=0)
    out = module.apply({"params": want}, x)
    np.testing.assert_allclose(loss, np.mean((out - y) ** 2), rtol=1e-5)


class _EqxBatchNorm(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(5, 3, key=key)
        self.norm = eqx.nn.BatchNorm(3, axis_name="batch", mode="batch")

    def __call__(self, x, state):
        return self.norm(self.linear(x), state)


def test_equinox_fit_and_state_equal_equinox_and_optax():
    x, y = data(32, 5), data(32, 2, seed=1)
    module = eqx.nn.MLP(5, 2, 8, 1, key=jax.random.PRNGKey(0))
    layer = EquinoxLayer(module)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    @eqx.filter_grad
    def grads(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    want, optimizer = module, optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(want, eqx.is_inexact_array))
    for i in range(0, 32, 8):
        g = grads(want, x[i : i + 8], y[i : i + 8])
        updates, opt_state = optimizer.update(g, opt_state)
        want = eqx.apply_updates(want, updates)
    assert_trees_close(
        eqx.filter(layer.module, eqx.is_inexact_array),
        eqx.filter(want, eqx.is_inexact_array),
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        model.predict(x, verbose=0), jax.vmap(want)(x), rtol=1e-5, atol=1e-6
    )
    # A stateful module: its state after a training call, as Equinox's.
    bn, state = eqx.nn.make_with_state(_EqxBatchNorm)(jax.random.PRNGKey(1))
    stateful = EquinoxLayer(bn, state=state)
    # On TensorFlow converted at the batch size (a collective over the
    # vmapped batch takes no symbolic size).
    stateful(x, training=True)
    _, new_state = jax.vmap(
        bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    assert_trees_close(stateful.eqx_state, new_state, rtol=1e-5)
    # And in `fit`, batch by batch.
    model = keras.Sequential([keras.Input((5,)), stateful])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, data(32, 3, seed=2), batch_size=8, shuffle=False, verbose=0)
    assert np.all(np.isfinite(model.predict(x, verbose=0)))


def test_unknown_sequence_length_with_integer_inputs():
    module = modules.Embedder()
    inputs = keras.Input((None,), dtype="int32")
    layer = FlaxLayer(module, seed=0)
    model = keras.Model(inputs, layer(inputs))
    for length in (5, 7):
        ids = np.random.default_rng(length).integers(0, 50, (4, length))
        np.testing.assert_allclose(
            model.predict(ids.astype("int32"), verbose=0),
            module.apply(layer.flax_variables, ids),
            rtol=1e-5,
            atol=1e-6,
        )


def test_batch_norm_statistics_update_in_fit_as_in_flax():
    x, y = data(16, 5), data(16, 1, seed=1)
    module = modules.BatchNormOnly()
    layer, model = _sgd_model(module, 5)
    initial = layer.flax_variables
    model.train_on_batch(x, y)

    _, updated = module.apply(
        initial, x, training=True, mutable=["batch_stats"]
    )
    after = layer.flax_variables
    assert_trees_close(after["batch_stats"], updated["batch_stats"])
    want = _mse_sgd_reference(
        module,
        initial,
        [(x, y)],
        0.1,
        training=True,
        mutable=["batch_stats"],
    )
    assert_trees_close(after["params"], want, rtol=1e-4)
    # Inference uses the running averages and leaves them alone.
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        module.apply(after, x, training=False),
        rtol=1e-5,
        atol=1e-6,
    )
    assert_trees_close(
        layer.flax_variables["batch_stats"], after["batch_stats"]
    )


def _masks(seed, steps=2):
    layer = FlaxLayer(modules.MaskRecorder(), seed=seed)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile("sgd", "mse")
    masks = []
    for step in range(steps):
        model.train_on_batch(data(4, 3, seed=step), data(4, 1))
        masks.append(np.asarray(layer.flax_variables["masks"]["last"]))
    return masks


def test_dropout_mask_is_fresh_every_step_and_reproducible_with_seed():
    first, second = _masks(seed=3)
    for mask in (first, second):
        assert set(np.unique(mask)) == {0.0, 2.0}  # real dropout, rate 0.5
    assert not np.array_equal(first, second)
    again = _masks(seed=3)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    assert not np.array_equal(_masks(seed=4)[0], first)


def test_jax_layer_with_state_and_rng():
    x = data(8, 4)
    layer = JaxLayer(modules.stateful_call, modules.stateful_init, seed=0)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile("sgd", "mse")
    model.train_on_batch(x, data(8, 3, seed=1))
    model.train_on_batch(x, data(8, 3, seed=1))
    assert int(numpy(layer.state["steps"])) == 2  # int state, written back
    assert np.abs(numpy(layer.state["mean"])).sum() > 0
    params = jax.tree.map(lambda v: jnp.asarray(numpy(v)), layer.params)
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        modules.dense_call(params, x),
        rtol=1e-5,
        atol=1e-6,
    )


def test_nnx_module_trains_like_nnx_and_the_module_follows():
    x, y = data(8, 4), data(8, 2, seed=1)
    layer = FlaxLayer(nnx_modules.MLP(nnx.Rngs(0)))
    # Arrays of its own: the layer shares the module's, which fit donates.
    graphdef, state = nnx.split(layer.module)
    reference = nnx.merge(graphdef, jax.tree.map(lambda a: a.copy(), state))
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.train_on_batch(x, y)

    def loss(module):
        return jnp.mean((module(x) - y) ** 2)

    grads = nnx.grad(loss)(reference)
    params = nnx.state(reference, nnx.Param)
    nnx.update(reference, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
    assert_trees_close(
        nnx.state(layer.module, nnx.Param), nnx.state(reference, nnx.Param)
    )
    np.testing.assert_allclose(
        model.predict(x, verbose=0), reference(x), rtol=1e-5, atol=1e-6
    )


class WithDropout(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.linear(x))


def test_the_module_of_a_layer_with_rng_streams_reads_after_predict():
    """RNG key data comes back from every backend's variables as JAX's
    uint32 key data (PyTorch holds it as int32)."""
    module = WithDropout(nnx.Rngs(0))
    expected = np.array(jax.random.key_data(module.drop.rngs.key[...]))
    layer = FlaxLayer(module)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.predict(data(8, 4), verbose=0)
    module = layer.module
    np.testing.assert_array_equal(
        jax.random.key_data(module.drop.rngs.key[...]), expected
    )
    module.eval()
    np.testing.assert_allclose(
        model.predict(data(8, 4), verbose=0), module(data(8, 4)), rtol=1e-6
    )


def test_lazy_and_input_sized_modules_build_and_train_as_nnx_does():
    x, y = data(8, 5), data(8, 2, seed=1)
    bridged = FlaxLayer(nnx.bridge.ToNNX(nn.Dense(3), rngs=nnx.Rngs(0)))
    head = FlaxLayer.from_nnx(
        nnx.Linear, FlaxLayer.input_dim(), 2, rngs=nnx.Rngs(1)
    )
    model = keras.Sequential([keras.Input((5,)), bridged, head])
    reference_bridge = nnx.bridge.lazy_init(
        nnx.bridge.ToNNX(nn.Dense(3), rngs=nnx.Rngs(0)), x[:1]
    )
    reference_head = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.train_on_batch(x, y)

    def loss(bridge, linear):
        return jnp.mean((linear(bridge(x)) - y) ** 2)

    grads = nnx.grad(loss, argnums=(0, 1))(reference_bridge, reference_head)
    for reference, grad in zip(
        (reference_bridge, reference_head), grads, strict=True
    ):
        params = nnx.state(reference, nnx.Param)
        nnx.update(
            reference, jax.tree.map(lambda p, g: p - 0.1 * g, params, grad)
        )
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        reference_head(reference_bridge(x)),
        rtol=1e-5,
        atol=1e-6,
    )
    # The nested summary's rows add up on every backend.
    assert sum(r.count_params() for r in head.layers) == head.count_params()


def test_lora_trains_the_adapters_only_as_nnx_does_and_takes_assignment():
    x, y = data(16, 4), data(16, 3, seed=1)
    layer = FlaxLayer(nnx_modules.LoRAMLP(nnx.Rngs(0)), wrt=nnx.LoRAParam)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    reference = nnx_modules.LoRAMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(reference, optax.sgd(0.1), wrt=nnx.LoRAParam)

    def loss(module, x, y):
        return jnp.mean((module(x) - y) ** 2)

    diff = nnx.DiffState(0, nnx.LoRAParam)
    for i in (0, 8):
        batch = x[i : i + 8], y[i : i + 8]
        grads = nnx.grad(loss, argnums=diff)(reference, *batch)
        optimizer.update(reference, grads)
    assert_trees_close(
        nnx.state(layer.module, nnx.Param),
        nnx.state(reference, nnx.Param),
        rtol=1e-5,
        atol=1e-5,
    )
    fresh = nnx_modules.LoRAMLP(nnx.Rngs(3))
    layer.flax_variables = nnx.state(fresh)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), fresh(x), rtol=1e-5, atol=1e-6
    )


LOADER = """
import json, sys
import numpy as np
import keras
import keras_flax
import tests.modules  # the module's code, trusted
model = keras.models.load_model(sys.argv[1])
x = np.load(sys.argv[2])
print(keras.backend.backend(), json.dumps(model.predict(x, verbose=0).tolist()))
"""


@pytest.mark.slow
def test_keras_file_loads_in_a_new_process(tmp_path):
    x, y = data(16, 5), data(16, 2, seed=1)
    layer = FlaxLayer(modules.BatchNormDropout(), seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile("adam", "mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    model.save(str(tmp_path / "model.keras"))
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(LOADER),
            str(tmp_path / "model.keras"),
            str(tmp_path / "x.npy"),
        ],
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    backend, predictions = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert backend == keras.backend.backend()
    np.testing.assert_array_equal(
        np.asarray(json.loads(predictions), "float32"),
        model.predict(x, verbose=0),
    )


def test_packed_weights_train_as_unpacked():
    x, y = data(16, 5), data(16, 2, seed=1)
    layers = []
    for packed in (False, True):
        layer = FlaxLayer(
            modules.BatchNormDropout(), seed=0, pack_weights=packed
        )
        model = keras.Sequential([keras.Input((5,)), layer])
        model.compile("adam", "mse")
        model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        layers.append(layer)
    assert len(layers[1].trainable_variables) == 1
    assert_trees_close(layers[0].flax_variables, layers[1].flax_variables, 1e-5)


def test_export_stablehlo_on_jax_refused_elsewhere_with_the_fix(tmp_path):
    import keras_flax

    model = keras.Sequential([keras.Input((5,)), FlaxLayer(modules.MLP())])
    x = data(3, 5)
    expected = numpy(model.predict(x, verbose=0))
    path = tmp_path / "m.stablehlo"
    if keras.backend.backend() == "jax":
        exported = keras_flax.export_stablehlo(model, path, verbose=False)
        np.testing.assert_allclose(exported.call(x), expected, 1e-6, 1e-6)
        return
    try:
        keras_flax.export_stablehlo(model, path)
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError(
            "export_stablehlo ran on " + keras.backend.backend()
        )
    assert f"Received: backend='{keras.backend.backend()}'" in message
    assert "Fix: set `KERAS_BACKEND=jax`" in message
    assert not path.exists()


def test_optax_optimizer_on_jax_refused_elsewhere_with_the_fix():
    import keras_flax

    if keras.backend.backend() == "jax":
        assert keras_flax.OptaxOptimizer(optax.adam(1e-3)).name == "optax"
        return
    try:
        keras_flax.OptaxOptimizer(optax.adam(1e-3))
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError(
            "OptaxOptimizer made on " + keras.backend.backend()
        )
    assert f"Received: backend='{keras.backend.backend()}'" in message
    assert "Fix: set `KERAS_BACKEND=jax`" in message


def test_quantize_on_jax_refused_elsewhere_with_the_fix():
    layer = FlaxLayer(modules.MLP(), seed=0, name="mlp")
    model = keras.Sequential([keras.Input((5,)), layer])
    before = [w.path for w in layer.weights]
    if keras.backend.backend() == "jax":
        model.quantize("int8")
        assert layer.quantization_mode == "int8"
        return
    # `model.quantize` turns the refusal into a warning, as for a native
    # layer without the mode; the layer stays float.
    with pytest.warns(UserWarning, match="'mlp' is quantized on the JAX"):
        model.quantize("int8")
    assert layer.quantization_mode is None
    assert [w.path for w in layer.weights] == before
    with pytest.raises(NotImplementedError, match="`KERAS_BACKEND=jax`"):
        layer.quantize("int8")
