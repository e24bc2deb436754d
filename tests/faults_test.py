"""Faults during training: interruption, checkpoints, NaN, sharing."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_flax import FlaxLayer
from tests import modules
from tests.conftest import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Interrupt(keras.callbacks.Callback):
    """Raises in the middle of an epoch, as a preempted job would stop."""

    def __init__(self, epoch, step):
        super().__init__()
        self.at = (epoch, step)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("preempted")


def _model(lr=0.05):
    layer = FlaxLayer(modules.BatchNormDropout(), seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def _fit(model, epochs=4, callbacks=()):
    x, y = data(32, 5), data(32, 2, seed=1)
    return model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        callbacks=list(callbacks),
        verbose=0,
    )


def _assert_same_weights(a, b):
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_interrupted_fit_resumed_with_backup_and_restore(tmp_path):
    uninterrupted = _model()
    _fit(uninterrupted)

    backup = str(tmp_path / "backup")
    interrupted = _model()
    with pytest.raises(RuntimeError, match="preempted"):
        _fit(
            interrupted,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup),
                Interrupt(epoch=2, step=1),
            ],
        )
    resumed = _model()  # a new process would build the model anew
    history = _fit(
        resumed, callbacks=[keras.callbacks.BackupAndRestore(backup)]
    )
    assert len(history.history["loss"]) == 2  # epochs 2 and 3 only
    _assert_same_weights(resumed, uninterrupted)


@pytest.mark.slow
def test_best_checkpoint_loads_in_a_new_process(tmp_path):
    model = _model()
    path = str(tmp_path / "best.keras")
    _fit(
        model,
        callbacks=[
            keras.callbacks.ModelCheckpoint(
                path, monitor="loss", save_best_only=True
            )
        ],
    )
    x = data(6, 5, seed=3)
    np.save(tmp_path / "x.npy", x)
    best = keras.saving.load_model(path)
    np.save(tmp_path / "want.npy", best.predict(x, verbose=0))
    stats = best.layers[0].flax_variables["batch_stats"]["BatchNorm_0"]
    assert not np.allclose(stats["mean"], 0)  # moving statistics included
    code = """
    import sys, numpy as np, keras_flax, keras
    from tests import modules
    folder = sys.argv[1]
    model = keras.saving.load_model(f"{folder}/best.keras")
    got = model.predict(np.load(f"{folder}/x.npy"), verbose=0)
    print(np.array_equal(got, np.load(f"{folder}/want.npy")))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.strip().endswith("True"), result.stderr[-3000:]


def test_terminate_on_nan_stops_and_leaves_the_last_good_weights(tmp_path):
    model = _model()
    path = str(tmp_path / "good.keras")
    schedule = keras.callbacks.LearningRateScheduler(
        lambda epoch: 0.05 if epoch < 2 else 1e30
    )
    history = _fit(
        model,
        epochs=6,
        callbacks=[
            schedule,
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.ModelCheckpoint(
                path, monitor="loss", save_best_only=True
            ),
        ],
    )
    losses = history.history["loss"]
    assert len(losses) < 6 and not np.isfinite(losses[-1])
    good = keras.saving.load_model(path)
    assert np.isfinite(good.predict(data(4, 5), verbose=0)).all()


def test_two_layers_around_one_linen_module_have_their_own_weights():
    module = modules.MLP()
    first, second = FlaxLayer(module, seed=1), FlaxLayer(module, seed=2)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, [first(inputs), second(inputs)])
    before = second.get_weights()
    model.compile("sgd", ["mse", None])
    model.fit(data(8, 3), [data(8, 4), data(8, 4)], verbose=0)
    assert len(model.trainable_weights) == 8  # 4 each, not shared
    for a, b in zip(second.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # no loss on it: unchanged
    assert not np.array_equal(first.get_weights()[0], second.get_weights()[0])


def test_one_layer_called_twice_shares_its_weights():
    module = modules.MLP()
    layer = FlaxLayer(module, seed=0)
    a_in, b_in = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([a_in, b_in], layer(a_in) + layer(b_in))
    assert len(model.trainable_weights) == 4
    a, b = data(4, 3), data(4, 3, seed=1)
    variables = layer.flax_variables
    np.testing.assert_allclose(
        model.predict([a, b], verbose=0),
        module.apply(variables, a) + module.apply(variables, b),
        1e-6,
    )
    trainable = [v.value for v in model.trainable_variables]

    def loss(trainable):
        state = [v.value for v in model.non_trainable_variables]
        out, _ = model.stateless_call(trainable, state, [a, b])
        return jnp.sum(out**2)

    def flax_loss(params):
        v = {"params": params}
        return jnp.sum((module.apply(v, a) + module.apply(v, b)) ** 2)

    got = jax.grad(loss)(trainable)
    want = jax.tree.leaves(jax.grad(flax_loss)(variables["params"]))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, 1e-5, 1e-6)
