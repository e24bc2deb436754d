"""`OptaxOptimizer`: the whole update is Optax's, against a hand-written
`tx.update` + `optax.apply_updates` loop on the same gradients."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import keras_flax
from keras_flax import FlaxLayer
from keras_flax import OptaxOptimizer
from tests import modules
from tests.conftest import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X, Y = data(32, 5), data(32, 4, seed=1)


def model_with(optimizer, steps_per_execution=1, flax=True):
    """A named model (Keras variable paths are the Optax keys)."""
    if flax:
        layer = FlaxLayer(modules.MLP(), seed=0, name="mlp")
    else:
        layer = keras.layers.Dense(4, name="dense")
    model = keras.Sequential([keras.Input((5,)), layer], name="model")
    model.compile(optimizer, "mse", steps_per_execution=steps_per_execution)
    return model


def hand_written(model, tx, initial, epochs=2, batch=8):
    """The same steps in plain Optax, from the model's initial weights."""
    names = [v.path for v in model.trainable_variables]
    params = dict(zip(names, map(jnp.asarray, initial), strict=True))
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(params, x, y):
        values = [params[n] for n in names]
        out, _ = model.stateless_call(values, non_trainable, x)
        return jnp.mean((out - y) ** 2)

    state = tx.init(params)
    for _ in range(epochs):
        for i in range(0, len(X), batch):
            grads = jax.grad(loss)(params, X[i : i + batch], Y[i : i + batch])
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    return [params[n] for n in names]


def assert_trained_as(model, want):
    got = [v.value for v in model.trainable_variables]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def chain():
    return optax.chain(optax.clip_by_global_norm(0.05), optax.adam(1e-2))


def masked():
    # Keyed by our Flax-path names: decay the kernels only.
    def kernels(params):
        return {path: path.endswith("kernel") for path in params}

    return optax.chain(
        optax.adam(1e-2), optax.masked(optax.add_decayed_weights(0.1), kernels)
    )


def multi_transform():
    def labels(params):
        return {p: "first" if "Dense_0" in p else "rest" for p in params}

    return optax.multi_transform(
        {"first": optax.sgd(0.1), "rest": optax.adam(1e-2)}, labels
    )


TRANSFORMATIONS = {
    "adam": lambda: optax.adam(1e-2),
    "adamw_schedule": lambda: optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 8), weight_decay=0.1
    ),
    "clip_chain": chain,
    "masked": masked,
    "multi_transform": multi_transform,
    "multi_steps": lambda: optax.MultiSteps(optax.adam(1e-2), 2),
}


@pytest.mark.parametrize("name", TRANSFORMATIONS)
def test_fit_equals_a_hand_written_optax_loop(name):
    tx = TRANSFORMATIONS[name]()
    model = model_with(OptaxOptimizer(tx))
    initial = [v.numpy() for v in model.trainable_variables]
    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert_trained_as(model, hand_written(model, tx, initial))
    assert int(model.optimizer.iterations.numpy()) == 8


def test_train_on_batch_steps_per_execution_and_native_layers():
    tx = optax.adamw(1e-2, weight_decay=0.1)
    for model in (
        model_with(OptaxOptimizer(tx), steps_per_execution=4),
        model_with(OptaxOptimizer(tx), flax=False),
    ):
        initial = [v.numpy() for v in model.trainable_variables]
        model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        assert_trained_as(model, hand_written(model, tx, initial))

    model = model_with(OptaxOptimizer(optax.adamw, learning_rate=1e-2))
    initial = [v.numpy() for v in model.trainable_variables]
    for i in range(0, 32, 8):
        model.train_on_batch(X[i : i + 8], Y[i : i + 8])
    want = hand_written(model, optax.adamw(1e-2), initial, epochs=1)
    assert_trained_as(model, want)


def test_state_is_held_in_keras_optimizer_variables():
    model = model_with(OptaxOptimizer(optax.adam(1e-2)))
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    optimizer = model.optimizer
    names = {v.path for v in optimizer.variables}
    # Adam's two moments, per parameter, named after it; and its count.
    kernel = "model_mlp_Dense_0_kernel"
    assert any(kernel in n and "mu" in n for n in names)
    assert any(kernel in n and "nu" in n for n in names)
    assert any(n.endswith("count") for n in names)
    state = optimizer.transformation.init(
        {v.path: v.value for v in model.trainable_variables}
    )
    assert len(optimizer.variables) == 2 + len(jax.tree.leaves(state))


def uninterrupted_and_resumed(tmp_path, make):
    """Weights after 4 epochs straight, and after 2 + save/load + 2."""
    straight = model_with(make())
    straight.fit(X, Y, batch_size=8, epochs=4, shuffle=False, verbose=0)

    first = model_with(make())
    first.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    first.save(tmp_path / "m.keras")
    resumed = keras.saving.load_model(tmp_path / "m.keras")
    resumed.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return straight, resumed


def test_save_and_load_resume_exactly_with_a_factory(tmp_path):
    def make():
        return OptaxOptimizer(
            optax.adamw, learning_rate=1e-2, weight_decay=1e-3
        )

    straight, resumed = uninterrupted_and_resumed(tmp_path, make)
    assert isinstance(resumed.optimizer, OptaxOptimizer)
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), 1e-6, 1e-6)
    for a, b in zip(
        straight.optimizer.variables, resumed.optimizer.variables, strict=True
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), 1e-6, 1e-6)


def test_backup_and_restore_resumes_exactly(tmp_path):
    def make():
        return OptaxOptimizer(optax.adam, learning_rate=1e-2)

    straight = model_with(make())
    straight.fit(X, Y, batch_size=8, epochs=4, shuffle=False, verbose=0)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = model_with(make())
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(
            X,
            Y,
            batch_size=8,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[backup, Interrupt()],
        )
    resumed = model_with(make())
    resumed.fit(
        X,
        Y,
        batch_size=8,
        epochs=4,
        shuffle=False,
        verbose=0,
        callbacks=[backup],
    )
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), 1e-6, 1e-6)


def test_a_ready_transformation_is_not_saved_but_its_weights_are(tmp_path):
    model = model_with(OptaxOptimizer(optax.adam(1e-2)))
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(TypeError) as raised:
        model.save(tmp_path / "m.keras")
    message = str(raised.value)
    assert "made from a ready transformation cannot be saved" in message
    assert "Received: transformation=GradientTransformation" in message
    assert "Fix: pass an importable factory" in message

    model.save_weights(tmp_path / "m.weights.h5")
    other = model_with(OptaxOptimizer(optax.adam(1e-2)))
    other.fit(X[:8], Y[:8], batch_size=8, epochs=1, verbose=0)  # builds it
    other.load_weights(tmp_path / "m.weights.h5")
    for a, b in zip(model.weights, other.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(
        model.optimizer.variables, other.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def own_chain(learning_rate):
    """An importable factory of the user's own."""
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(learning_rate)
    )


@pytest.mark.slow
def test_loading_follows_safe_mode_for_the_factory(tmp_path):
    model = model_with(OptaxOptimizer(own_chain, learning_rate=1e-2))
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    code = textwrap.dedent(
        """
        import sys, keras
        import keras_flax
        import tests.modules  # the model's module, not the factory's
        path = sys.argv[1]

        def refused(**kwargs):
            try:
                keras.saving.load_model(path, **kwargs)
            except ValueError as e:
                return str(e)
            raise AssertionError("loaded in safe mode")

        # Not imported: refused, naming the import.
        message = refused()
        assert "tests.optax_test" in message and "is not imported" in message
        # Imported, but a factory of the user's own is not on the allow-list
        # of what a file may call with its arguments.
        import tests.optax_test
        message = refused()
        assert "tests.optax_test:own_chain" in message, message
        assert "custom_objects" in message and "safe_mode=False" in message
        # Either fix loads it.
        name = "tests.optax_test:own_chain"
        loaded = keras.saving.load_model(
            path, custom_objects={name: tests.optax_test.own_chain}
        )
        print(type(loaded.optimizer).__name__)
        loaded = keras.saving.load_model(path, safe_mode=False)
        print(type(loaded.optimizer).__name__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.keras")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["OptaxOptimizer"] * 2


def test_an_optax_factory_loads_in_safe_mode(tmp_path):
    model = model_with(OptaxOptimizer(optax.adamw, learning_rate=1e-2))
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.get_config()["factory"]["path"] == "optax:adamw"


def test_learning_rate_of_inject_hyperparams_in_logs_and_history(capsys):
    schedule = optax.linear_schedule(1e-2, 1e-3, 8)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
    model = model_with(OptaxOptimizer(tx))
    history = model.fit(
        X,
        Y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=2,
        callbacks=[keras_flax.LearningRateLogger()],
    )
    printed = capsys.readouterr().out
    assert printed.count("learning_rate: ") == 2  # the progress bar
    # After steps 4 and 8 the state holds the rates of steps 3 and 7.
    np.testing.assert_allclose(
        history.history["learning_rate"],
        [schedule(3), schedule(7)],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(model.optimizer.learning_rate.numpy()), schedule(7), rtol=1e-6
    )
    model.summary()
    assert "Total params" in capsys.readouterr().out


def test_learning_rate_scheduler_is_refused_with_the_fix():
    model = model_with(OptaxOptimizer(optax.adam(1e-2)))
    scheduler = keras.callbacks.LearningRateScheduler(lambda e, lr: 1e-3)
    with pytest.raises(ValueError) as raised:
        model.fit(
            X, Y, batch_size=8, epochs=1, verbose=0, callbacks=[scheduler]
        )
    message = str(raised.value)
    assert "The learning rate of an `OptaxOptimizer` is Optax's" in message
    assert "Received: learning_rate=0.001" in message
    assert "Fix: give the schedule to Optax" in message
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)  # still trains


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        (("adam",), {}, "Received: transformation='adam' (str)"),
        ((optax.adam(1e-3),), {"learning_rate": 1e-3}, "['learning_rate']"),
        ((lambda: 3,), {}, "which returned 3 (int)"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(args, kwargs, fragment):
    with pytest.raises(TypeError) as raised:
        OptaxOptimizer(*args, **kwargs)
    assert fragment in str(raised.value)
    assert "Fix:" in str(raised.value)
    OptaxOptimizer(optax.adam, learning_rate=1e-3)  # fixed


class TwoLayers(keras.Model):
    """Two layers; Keras lets a subclassed model give both one name."""

    def __init__(self, first, second):
        super().__init__(name="two")
        self.first = FlaxLayer(modules.MLP(), seed=0, name=first)
        self.second = FlaxLayer(modules.MLP(), seed=1, name=second)

    def call(self, x):
        return self.first(x) + self.second(x)


def test_variables_sharing_a_path_are_refused_with_the_fix():
    model = TwoLayers("same", "same")
    model(X[:2])
    model.compile(OptaxOptimizer(optax.adam(1e-2)), "mse")
    with pytest.raises(ValueError) as raised:
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    message = str(raised.value)
    assert "keys parameters by their Keras variable paths" in message
    assert "Received: paths ['two/same/Dense_0/bias'" in message
    assert "Fix: give the layers holding them distinct names" in message
    assert not model.optimizer.built  # nothing half-built

    fixed = TwoLayers("first", "second")
    fixed.compile(OptaxOptimizer(optax.adam(1e-2)), "mse")
    fixed(X[:2])
    initial = [v.numpy() for v in fixed.trainable_variables]
    fixed.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert_trained_as(fixed, hand_written(fixed, optax.adam(1e-2), initial))
