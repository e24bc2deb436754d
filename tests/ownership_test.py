"""The layer owns what it donates (SPEC 13.1): arrays the user holds apart
from the layer survive every Keras call, whose compiled steps donate the
variables' buffers.

The user's copies are checked against NumPy copies made before wrapping
(`np.array(..., copy=True)`: a NumPy *view* of a CPU array would pin its
buffer and make XLA copy instead of donate, hiding the bug).
"""

import equinox as eqx
import flax.linen as nn
import jax
import keras
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from keras_flax import EquinoxLayer
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from tests import modules
from tests.conftest import data

X = data(16, 4)
Y = data(16, 2, seed=1)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def _copies(tree):
    """NumPy copies of every array leaf (key data for RNG keys)."""

    def copy(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.prng_key
        ):
            leaf = jax.random.key_data(leaf)
        return np.array(leaf, copy=True)

    return jax.tree.map(copy, tree)


def _assert_same(tree, expected):
    got = _copies(tree)  # raises if an array was deleted
    for a, b in zip(
        jax.tree.leaves(got), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def _every_keras_call(model):
    model.compile("adam", "mse")
    model.predict(X, verbose=0)
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    model.evaluate(X, Y, verbose=0)
    model.train_on_batch(X, Y)


def _model(*layers):
    inputs = keras.Input((4,))
    outputs = [layer(inputs) for layer in layers]
    if len(outputs) > 1:
        outputs = keras.layers.Add()(outputs)
    return keras.Model(inputs, outputs)


def test_a_clone_made_before_wrapping_survives_every_keras_call():
    student = Net(nnx.Rngs(0))
    teacher = nnx.clone(student)
    before = _copies(nnx.state(teacher))
    _every_keras_call(_model(FlaxLayer(student)))
    _assert_same(nnx.state(teacher), before)
    teacher(X)  # usable as a module
    # The student trained; the teacher did not.
    assert not np.array_equal(
        np.asarray(student.fc1.kernel.get_value()), before["fc1"]["kernel"]
    )


def test_a_state_snapshot_kept_before_wrapping_survives():
    module = Net(nnx.Rngs(0))
    snapshot = nnx.state(module).to_pure_dict()
    before = _copies(snapshot)
    _every_keras_call(_model(FlaxLayer(module)))
    _assert_same(snapshot, before)


def test_an_ensemble_of_clones_trains_as_independent_modules():
    """Two layers wrapping a module and its clone train exactly as two
    layers wrapping two modules made apart with the same seed."""
    a = Net(nnx.Rngs(0))
    shared = _model(FlaxLayer(a, seed=1), FlaxLayer(nnx.clone(a), seed=2))
    apart = _model(
        FlaxLayer(Net(nnx.Rngs(0)), seed=1),
        FlaxLayer(Net(nnx.Rngs(0)), seed=2),
    )
    for model in (shared, apart):
        model.compile("adam", "mse")
        model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for got, expected in zip(
        shared.get_weights(), apart.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(got, expected)
    # Each module reads its own layer's trained values.
    for layer in shared.layers:
        if isinstance(layer, FlaxLayer):
            kernel = next(w for w in layer.weights if "fc1/kernel" in w.path)
            np.testing.assert_array_equal(
                np.asarray(layer.module.fc1.kernel.get_value()), kernel.numpy()
            )


def test_one_module_wrapped_by_two_layers_trains():
    module = Net(nnx.Rngs(0))
    model = _model(FlaxLayer(module), FlaxLayer(module))
    _every_keras_call(model)


class Shared(nnx.Module):
    """One array held by two attributes (as `self.a = t; self.b = t`)."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 2, rngs=rngs)
        mask = jax.numpy.ones((2,))
        self.mask_a = nnx.Param(mask)
        self.mask_b = nnx.Param(mask)

    def __call__(self, x):
        return self.linear(x) * self.mask_a[...] * self.mask_b[...]


def test_an_array_held_by_two_attributes_trains():
    module = Shared(nnx.Rngs(0))
    reference = nnx.clone(module)
    model = _model(FlaxLayer(module))
    _every_keras_call(model)
    # One buffer per attribute: each trains as its own parameter.
    names = sorted(w.path.split("/", 1)[1] for w in model.layers[1].weights)
    assert names == ["linear/bias", "linear/kernel", "mask_a", "mask_b"]
    reference(X)


def test_linen_variables_given_survive():
    module = modules.MLP(features=(8, 2))
    variables = module.init(jax.random.PRNGKey(0), X)
    before = _copies(variables)
    _every_keras_call(_model(FlaxLayer(module, variables=variables)))
    _assert_same(variables, before)


def test_jax_layer_params_given_survive():
    params = modules.dense_init(jax.random.PRNGKey(0), X)
    params = {
        "dense": {
            "w": params["dense"]["w"][:, :2],
            "b": params["dense"]["b"][:2],
        }
    }
    before = _copies(params)
    layer = JaxLayer(modules.dense_call, params=params)
    _every_keras_call(_model(layer))
    _assert_same(params, before)


def test_an_equinox_module_survives():
    module = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.PRNGKey(0))
    before = _copies(eqx.filter(module, eqx.is_array))
    _every_keras_call(_model(EquinoxLayer(module)))
    _assert_same(eqx.filter(module, eqx.is_array), before)


def test_flax_variables_assigned_survive():
    module = Net(nnx.Rngs(0))
    layer = FlaxLayer(module)
    model = _model(layer)
    values = nnx.state(Net(nnx.Rngs(5))).to_pure_dict()
    before = _copies(values)
    layer.flax_variables = values
    _every_keras_call(model)
    _assert_same(values, before)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_arrays_given_to_set_weights_survive(kind):
    if kind == "nnx":
        layer = FlaxLayer(Net(nnx.Rngs(0)))
    else:
        layer = FlaxLayer(modules.MLP(features=(8, 2)), seed=0)
    model = _model(layer)
    given = [
        jax.numpy.asarray(np.array(w, copy=True) + 1.0)
        for w in layer.get_weights()
    ]
    before = _copies(given)
    layer.set_weights(given)
    for w, expected in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, expected)
    _every_keras_call(model)
    _assert_same(given, before)


# Orbax's notices when it restores without a target's shardings.
@pytest.mark.filterwarnings(
    "ignore:Sharding info not provided:UserWarning",
    "ignore::DeprecationWarning:orbax.*",
)
def test_an_orbax_restore_assigned_survives(tmp_path):
    """A plain NNX checkpoint restored by Orbax and assigned to the layer:
    the restored tree stays the user's (a second model, a comparison)."""
    trained = Net(nnx.Rngs(3))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "nnx", nnx.state(trained))
    checkpointer.wait_until_finished()
    layer = FlaxLayer(Net(nnx.Rngs(0)))
    model = _model(layer)
    restored = checkpointer.restore(tmp_path / "nnx", layer.flax_variables)
    before = _copies(restored)
    layer.flax_variables = restored
    _assert_same(layer.flax_variables, _copies(nnx.state(trained)))
    _every_keras_call(model)
    _assert_same(restored, before)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_a_clone_made_before_quantize_survives(kind):
    if kind == "nnx":
        module = Net(nnx.Rngs(0))
        keep = nnx.clone(module)
        before = _copies(nnx.state(keep))
        layer = FlaxLayer(module)
    else:
        module = nn.Dense(2)
        variables = module.init(jax.random.PRNGKey(0), X)
        keep = variables
        before = _copies(variables)
        layer = FlaxLayer(module, variables=variables)
    model = _model(layer)
    model.quantize("int8")
    model.predict(X, verbose=0)
    _assert_same(nnx.state(keep) if kind == "nnx" else keep, before)


def test_a_frozen_layer_changes_none_of_its_state_in_fit():
    """`trainable=False` runs the module in inference mode (Keras' frozen
    BatchNormalization): statistics, RNG counts and weights stay; the
    model trains around it."""
    teacher = Net(nnx.Rngs(0))
    reference = nnx.clone(teacher)
    frozen = FlaxLayer(teacher, trainable=False)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(frozen(inputs)))
    before = _copies(nnx.state(reference))
    model.compile("adam", "mse")
    model.fit(X, Y, batch_size=8, epochs=2, verbose=0)
    model.train_on_batch(X, Y)
    frozen.sync_module()
    _assert_same(nnx.state(teacher), before)
    reference.eval()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(frozen(X, training=True)),
        np.asarray(reference(X)),
        rtol=1e-6,
    )


class Doubling(nnx.Module):
    """Arrays in an immutable container (`nnx.data((a, b))`, as NNX's own
    error message recommends), one of them updated by each call."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 2, rngs=rngs)
        self.masks = nnx.data((jax.numpy.ones(2), jax.numpy.zeros(2)))

    def __call__(self, x):
        self.masks = (self.masks[0] * 2, self.masks[1])
        return self.linear(x) * self.masks[0] + self.masks[1]


def test_arrays_in_an_immutable_container_are_written_back():
    module = Doubling(nnx.Rngs(0))
    reference = nnx.clone(module)
    model = _model(FlaxLayer(module))
    model.compile("sgd", "mse")
    model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for _ in range(2):  # two steps, as plain NNX
        reference(X[:8])
    assert type(module.masks) is tuple
    _assert_same(module.masks, _copies(reference.masks))
