"""Keras' NNX mode (`KERAS_NNX_ENABLED=true`, Keras 3.11 and newer): linen
and NNX layers train, predict, save and load as plain Flax and optax do.

Keras reads the variable when it is imported, so the checks run in a new
process.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys
import jax, jax.numpy as jnp, keras, numpy as np, optax
from flax import nnx
assert keras.config.is_nnx_enabled()
from keras_flax import FlaxLayer
from tests import modules, nnx_modules
from tests.conftest import data

folder = sys.argv[1]


def trained(layer, x, y):
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    for _ in range(3):
        model.train_on_batch(x, y)
    return model


def close(a, b):
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def saved_and_loaded(model, name, x):
    path = f"{folder}/{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


# linen: the same steps as optax.sgd on module.apply.
x, y = data(16, 5), data(16, 4, seed=1)
module = modules.MLP()
variables = module.init(jax.random.key(0), x)
model = trained(FlaxLayer(module, variables=variables), x, y)
params, tx = variables["params"], optax.sgd(0.1)
opt_state = tx.init(params)


def linen_loss(params):
    return jnp.mean((module.apply({"params": params}, x) - y) ** 2)


for _ in range(3):
    updates, opt_state = tx.update(jax.grad(linen_loss)(params), opt_state)
    params = optax.apply_updates(params, updates)
close(model.layers[0].flax_variables["params"], params)
np.testing.assert_allclose(
    model.predict(x, verbose=0),
    module.apply({"params": params}, x),
    rtol=1e-5,
    atol=1e-6,
)
saved_and_loaded(model, "linen", x)

# NNX: the same steps as nnx.grad on the module; the module follows.
x, y = data(16, 4), data(16, 2, seed=1)
layer = FlaxLayer.from_nnx(nnx_modules.MLP, nnx.Rngs(0))
# Arrays of its own: the layer shares the module's, which fit donates.
graphdef, state = nnx.split(layer.module)
reference = nnx.merge(graphdef, jax.tree.map(lambda a: a.copy(), state))
model = trained(layer, x, y)


def nnx_loss(module):
    return jnp.mean((module(x) - y) ** 2)


for _ in range(3):
    grads = nnx.grad(nnx_loss)(reference)
    params = nnx.state(reference, nnx.Param)
    nnx.update(reference, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
close(nnx.state(layer.module, nnx.Param), nnx.state(reference, nnx.Param))
np.testing.assert_allclose(
    model.predict(x, verbose=0), reference(x), rtol=1e-5, atol=1e-6
)
saved_and_loaded(model, "nnx", x)
print("OK")
"""


@pytest.mark.slow
def test_linen_and_nnx_train_predict_save_and_load_in_keras_nnx_mode(
    tmp_path,
):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "jax", "KERAS_NNX_ENABLED": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OK"
