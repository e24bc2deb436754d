"""Today's Keras and Flax workflows around our layers: Keras' Orbax
checkpoints, `keras.RematScope`, Flax's tree mode (`NNX_GRAPH_MODE=false`)
and `nnx.capture`, each against plain Keras / JAX / Flax ground truth."""

import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from tests import modules
from tests import nnx_modules
from tests.conftest import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (layer, input shape, outputs)
LAYERS = {
    "linen": (
        lambda: FlaxLayer(modules.BatchNormDropout(), seed=0, name="flax"),
        (5,),
        2,
    ),
    "nnx": (
        lambda: FlaxLayer(
            nnx_modules.ConvBatchNormDropout(nnx.Rngs(0)), name="flax"
        ),
        (8, 8, 1),
        3,
    ),
    "packed": (
        lambda: FlaxLayer(
            modules.BatchNormDropout(), seed=0, pack_weights=True, name="flax"
        ),
        (5,),
        2,
    ),
    "jax_layer": (
        lambda: JaxLayer(
            modules.stateful_call, modules.stateful_init, seed=1, name="flax"
        ),
        (5,),
        3,
    ),
}


def compiled(make, shape, remat=False):
    inputs = keras.Input(shape)
    if remat:
        with keras.RematScope(mode="full"):
            layer = make()
    else:
        layer = make()
    model = keras.Model(inputs, layer(inputs), name="model")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


# Orbax's own notice when Keras restores without shardings.
@pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")
@pytest.mark.parametrize("kind", ["linen", "nnx", "packed"])
def test_orbax_checkpoint_restores_weights_exactly(kind, tmp_path):
    make, shape, outputs = LAYERS[kind]
    model = compiled(make, shape)
    x, y = data(16, *shape), data(16, outputs, seed=1)
    checkpoint = keras.callbacks.OrbaxCheckpoint(
        str(tmp_path / "orbax"), save_weights_only=True
    )
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[checkpoint])
    checkpoint.wait_until_finished()

    restored = compiled(make, shape)
    restored.load_weights(str(tmp_path / "orbax"))
    for a, b in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def grads_and_program(model, x, y):
    """Gradients of the mean squared error in training mode, and the
    program computing them."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable):
        outputs, _ = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return jnp.mean((outputs - y) ** 2)

    grads = jax.grad(loss)(trainable)
    return grads, str(jax.make_jaxpr(jax.grad(loss))(trainable))


@pytest.mark.parametrize("kind", ["linen", "nnx", "jax_layer"])
def test_remat_scope_gives_the_same_training_and_recomputes(kind):
    make, shape, outputs = LAYERS[kind]
    x, y = data(8, *shape), data(8, outputs, seed=1)
    plain, remat = compiled(make, shape), compiled(make, shape, remat=True)

    plain_grads, plain_program = grads_and_program(plain, x, y)
    remat_grads, remat_program = grads_and_program(remat, x, y)
    for a, b in zip(plain_grads, remat_grads, strict=True):
        np.testing.assert_allclose(a, b, 1e-6, 1e-6)
    assert "remat" not in plain_program
    assert "remat" in remat_program  # the forward pass is checkpointed

    # `fit` (training traced, the seed drawn outside the checkpoint).
    for model in (plain, remat):
        model.fit(x, y, epochs=2, batch_size=4, verbose=0, shuffle=False)
    for a, b in zip(plain.weights, remat.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), 1e-6, 1e-6)


TREE_MODE = """
import sys
import jax.numpy as jnp, keras, numpy as np, optax
from flax import nnx
import flax
assert not flax.config.nnx_graph_mode
from keras_flax import FlaxLayer
from tests import nnx_modules
from tests.conftest import data

x, y = data(8, 4), data(8, 2, seed=1)
module, reference = nnx_modules.MLP(nnx.Rngs(0)), nnx_modules.MLP(nnx.Rngs(0))
model = keras.Sequential([keras.Input((4,)), FlaxLayer(module)])
model.compile(keras.optimizers.SGD(0.1), "mse")
for _ in range(3):
    model.train_on_batch(x, y)

optimizer = nnx.Optimizer(reference, optax.sgd(0.1), wrt=nnx.Param)
loss = lambda m: jnp.mean((m(x) - y) ** 2)
for _ in range(3):
    optimizer.update(reference, nnx.grad(loss)(reference))
predicted = model.predict(x, verbose=0)
np.testing.assert_allclose(predicted, reference(x), 1e-5, 1e-6)
np.testing.assert_allclose(module(x), reference(x), 1e-5, 1e-6)

conv = keras.Sequential(
    [keras.Input((8, 8, 1)),
     FlaxLayer.from_nnx(nnx_modules.ConvBatchNormDropout, rngs=nnx.Rngs(0))]
)
conv.compile("adam", "mse")
images = data(8, 8, 8, 1)
conv.fit(images, data(8, 3), epochs=2, batch_size=4, verbose=0)
conv.save(sys.argv[1] + "/conv.keras")
loaded = keras.saving.load_model(sys.argv[1] + "/conv.keras")
got = loaded.predict(images, verbose=0)
np.testing.assert_allclose(got, conv.predict(images, verbose=0), 1e-6, 1e-6)
print("tree mode ok")
"""


@pytest.mark.slow
def test_nnx_layers_in_flax_tree_mode(tmp_path):
    """`NNX_GRAPH_MODE=false` (read when Flax is imported: a new process)."""
    env = {
        **os.environ,
        "NNX_GRAPH_MODE": "false",
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": ROOT,
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TREE_MODE), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tree mode ok" in result.stdout


class Sowing(nnx.Module):
    """Sows its features, for `nnx.capture` (or the older `sow` alone)."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        features = nnx.relu(self.hidden(x))
        self.sow(nnx.Intermediate, "features", features)
        return self.head(features)


def with_features(module, x):
    """The outputs and the features `nnx.capture` collects."""
    outputs, captured = nnx.capture(module, nnx.Intermediate)(x)
    return outputs, captured["features"].get_value()[0]


def test_nnx_capture_returns_intermediates_through_the_layer():
    x = data(6, 4)
    layer = FlaxLayer(Sowing(nnx.Rngs(0)), method=with_features)
    outputs, features = layer(x)
    expected, captured = nnx.capture(Sowing(nnx.Rngs(0)), nnx.Intermediate)(x)
    np.testing.assert_allclose(outputs, expected, 1e-6, 1e-6)
    np.testing.assert_allclose(
        features, captured["features"].get_value()[0], 1e-6, 1e-6
    )
    # Sown values are a call's output, never held as state.
    assert len(layer.trainable_weights) == 4  # two kernels, two biases
    assert layer.non_trainable_weights == []


# Flax 0.12.9+ can make `sow` outside `nnx.capture` a no-op
# (`flax.config.nnx_sow_capture_noop`); both settings, where it exists.
SOW_NOOP = [False] + (
    [True] if hasattr(flax.config, "nnx_sow_capture_noop") else []
)


@pytest.fixture(params=SOW_NOOP, ids=lambda noop: f"sow_noop={noop}")
def sow_setting(request):
    if not hasattr(flax.config, "nnx_sow_capture_noop"):
        yield request.param
        return
    before = flax.config.nnx_sow_capture_noop
    flax.config.update("nnx_sow_capture_noop", request.param)
    yield request.param
    flax.config.update("nnx_sow_capture_noop", before)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_module_sowing_outside_capture_trains_as_without_sowing(sow_setting):
    x, y = data(8, 4), data(8, 2, seed=1)
    sowing = keras.Sequential(
        [keras.Input((4,)), FlaxLayer(Sowing(nnx.Rngs(0)), name="sowing")]
    )
    sowing.compile(keras.optimizers.SGD(0.1), "mse")
    sowing.fit(x, y, epochs=2, batch_size=4, verbose=0, shuffle=False)
    layer = sowing.layers[0]
    assert len(layer.non_trainable_weights) == 0  # nothing sown is held
    lines = []
    sowing.summary(expand_nested=True, print_fn=lines.append)
    summary = "\n".join(lines)
    for row in ("sowing (FlaxLayer)", "hidden (Linear)", "head (Linear)"):
        assert row in summary, summary

    reference = Sowing(nnx.Rngs(0))
    params = nnx.state(reference, nnx.Param)
    graphdef = nnx.graphdef(reference)

    def loss(params, xb, yb):
        out = nnx.merge(graphdef, params)(xb)
        return jnp.mean((out - yb) ** 2)

    for _ in range(2):
        for i in (0, 4):
            grads = jax.grad(loss)(params, x[i : i + 4], y[i : i + 4])
            params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    np.testing.assert_allclose(
        sowing.predict(x, verbose=0),
        nnx.merge(graphdef, params)(x),
        1e-5,
        1e-6,
    )
