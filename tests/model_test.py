"""The conformance suite: the same checks on every registered kind of model.

Each kind of `_kinds.KINDS` has a case here: a layer of that kind, and the
ground truth of its framework (plain `call_fn`, linen `Module.apply`, an
NNX module called as it is). A new kind is correct once its case passes.
The suite asks the model what it supports (`Model.user_format`,
`Model.fine_tuning`) and checks those capabilities where it has them.
A `Model` written by hand, wrapped by `ModelLayer`, passes it too: the
contract is all a kind needs.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import keras_flax
from keras_flax import EquinoxLayer
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import _kinds
from keras_flax._layer import ModelLayer
from keras_flax._model import Model
from keras_flax._model import Rng
from tests import toy_kind
from tests.conftest import data
from tests.conftest import variable_values

# The models of the cases: a dense layer, running statistics of its
# outputs updated in training, and a head. Deterministic in training, so
# that the ground truth's new state is the layer's.


def affine_init(rng, inputs):
    k1, k2 = jax.random.split(rng)
    params = {
        "dense": {
            "w": jax.random.normal(k1, (inputs.shape[-1], 3)) * 0.3,
            "b": jnp.zeros((3,)),
        },
        "head": {"w": jax.random.normal(k2, (3, 2)) * 0.3},
    }
    return params, {"mean": jnp.zeros((3,))}


def affine_call(params, state, inputs, training):
    h = jnp.tanh(inputs @ params["dense"]["w"] + params["dense"]["b"])
    if training:
        state = {"mean": 0.9 * state["mean"] + 0.1 * h.mean(axis=0)}
    return (h - state["mean"]) @ params["head"]["w"], state


class LinenNorm(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
        h = jnp.tanh(nn.Dense(3, name="dense")(x))
        h = nn.BatchNorm(not training, momentum=0.9, name="norm")(h)
        return nn.Dense(2, name="head")(h)


class NnxNorm(nnx.Module):
    def __init__(self, rngs, in_features=4):
        self.dense = nnx.Linear(in_features, 3, rngs=rngs)
        self.norm = nnx.BatchNorm(3, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(jnp.tanh(self.dense(x))))


class EqxNorm(eqx.Module):
    dense: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.dense = eqx.nn.Linear(4, 3, key=k1)
        self.norm = eqx.nn.BatchNorm(3, axis_name="batch", mode="batch")
        self.head = eqx.nn.Linear(3, 2, key=k2)

    def __call__(self, x, state):
        h, state = self.norm(jnp.tanh(self.dense(x)), state)
        return self.head(h), state


def _functions_reference(layer, x, training):
    return affine_call(
        variable_values(layer.params), variable_values(layer.state), x, training
    )


def _linen_reference(layer, x, training):
    out, mutated = LinenNorm().apply(
        layer.flax_variables, x, training=training, mutable=["batch_stats"]
    )
    return out, mutated["batch_stats"]


def _nnx_reference(layer, x, training):
    # A copy of the layer's module (new Variables): the module holds the
    # layer's values.
    graphdef, state = nnx.split(layer.module)
    module = nnx.merge(graphdef, jax.tree.map(jnp.array, state))
    module.train() if training else module.eval()
    return module(x), nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))


def _equinox_reference(layer, x, training):
    module = layer.module
    if not training:
        module = eqx.nn.inference_mode(module)
    out, state = jax.vmap(
        module, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, layer.eqx_state)
    return out, jax.tree.leaves(state)


def _equinox_state(layer):
    return jax.tree.leaves(layer.eqx_state)


TOY = toy_kind.Chain(
    (
        ("dense", toy_kind.Dense(3)),
        ("centered", toy_kind.Centered(momentum=0.9)),
        ("head", toy_kind.Dense(2)),
    )
)


def _toy_reference(layer, x, training):
    params, stats = variable_values(layer.params), variable_values(layer.state)
    return TOY.apply(params, stats, x, training)


def _toy_state(layer):
    return variable_values(layer.state)


def _functions_state(layer):
    return variable_values(layer.state)


def _linen_state(layer):
    return layer.flax_variables["batch_stats"]


def _nnx_state(layer):
    return nnx.to_pure_dict(nnx.state(layer.module, nnx.BatchStat))


@dataclasses.dataclass(frozen=True)
class Case:
    """A layer of one kind and its framework's ground truth."""

    make: Callable[..., Any]  # (**layer kwargs) -> a fresh layer
    reference: Callable  # (layer, x, training) -> (outputs, new state)
    state_of: Callable  # layer -> its state, as `reference` returns it
    trainable: list  # the trainable weights' paths
    non_trainable: list  # the non-trainable weights' paths
    wrt: Any = None  # a filter choosing the head, where `wrt` applies
    trains_with_wrt: tuple = ()


CASES = {
    "functions": Case(
        make=lambda **kw: JaxLayer(
            affine_call, affine_init, seed=0, name="model", **kw
        ),
        reference=_functions_reference,
        state_of=_functions_state,
        trainable=[
            "model/dense/b",
            "model/dense/w",
            "model/head/w",
        ],
        non_trainable=["model/state/mean"],
    ),
    "linen": Case(
        make=lambda **kw: FlaxLayer(LinenNorm(), seed=0, name="model", **kw),
        reference=_linen_reference,
        state_of=_linen_state,
        trainable=[
            "model/dense/bias",
            "model/dense/kernel",
            "model/head/bias",
            "model/head/kernel",
            "model/norm/bias",
            "model/norm/scale",
        ],
        non_trainable=[
            "model/batch_stats/norm/mean",
            "model/batch_stats/norm/var",
        ],
        wrt=nnx.PathContains("head"),
        trains_with_wrt=("model/head/bias", "model/head/kernel"),
    ),
    "nnx": Case(
        make=lambda **kw: FlaxLayer.from_nnx(
            NnxNorm, rngs=nnx.Rngs(0), layer_kwargs={"name": "model", **kw}
        ),
        reference=_nnx_reference,
        state_of=_nnx_state,
        trainable=[
            "model/dense/bias",
            "model/dense/kernel",
            "model/head/bias",
            "model/head/kernel",
            "model/norm/bias",
            "model/norm/scale",
        ],
        non_trainable=["model/norm/mean", "model/norm/var"],
        wrt=nnx.PathContains("head"),
        trains_with_wrt=("model/head/bias", "model/head/kernel"),
    ),
    # The same module, its input size left to the build.
    "nnx-sized": Case(
        make=lambda **kw: FlaxLayer.from_nnx(
            NnxNorm,
            rngs=nnx.Rngs(0),
            in_features=FlaxLayer.input_dim(),
            layer_kwargs={"name": "model", **kw},
        ),
        reference=_nnx_reference,
        state_of=_nnx_state,
        trainable=[
            "model/dense/bias",
            "model/dense/kernel",
            "model/head/bias",
            "model/head/kernel",
            "model/norm/bias",
            "model/norm/scale",
        ],
        non_trainable=["model/norm/mean", "model/norm/var"],
        wrt=nnx.PathContains("head"),
        trains_with_wrt=("model/head/bias", "model/head/kernel"),
    ),
    "equinox": Case(
        make=lambda **kw: EquinoxLayer.from_constructor(
            EqxNorm, jax.random.PRNGKey(0), layer_kwargs={"name": "model", **kw}
        ),
        reference=_equinox_reference,
        state_of=_equinox_state,
        trainable=[
            "model/dense/bias",
            "model/dense/weight",
            "model/head/bias",
            "model/head/weight",
            "model/norm/bias",
            "model/norm/weight",
        ],
        non_trainable=[
            "model/state/norm/batch_counter",
            "model/state/norm/batch_state_index/0",
            "model/state/norm/batch_state_index/1",
        ],
        wrt=nnx.PathContains("head"),
        trains_with_wrt=("model/head/bias", "model/head/weight"),
    ),
    # Registered from the tests alone (`tests/toy_kind.py`).
    "toy": Case(
        make=lambda **kw: toy_kind.ToyLayer(TOY, seed=0, name="model", **kw),
        reference=_toy_reference,
        state_of=_toy_state,
        trainable=[
            "model/dense/b",
            "model/dense/w",
            "model/head/b",
            "model/head/w",
        ],
        non_trainable=["model/stats/centered/mean"],
    ),
}
KIND_NAMES = sorted(CASES)
X = data(6, 4)


def _built(case, **kwargs):
    layer = case.make(**kwargs)
    layer(X)
    return layer


def _close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
        a,
        b,
    )


def test_every_registered_kind_has_a_case():
    assert {kind.name for kind in _kinds.KINDS} == set(CASES)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_init_and_apply_equal_the_framework(kind):
    case = CASES[kind]
    layer = _built(case)
    expected, _ = case.reference(layer, X, False)
    out = layer(X)
    assert out.shape == (6, 2)
    _close(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_training_call_updates_the_state_as_the_framework(kind):
    case = CASES[kind]
    layer = _built(case)
    before = case.state_of(layer)
    expected_out, expected_state = case.reference(layer, X, True)
    out = layer(X, training=True)
    _close(np.asarray(out), np.asarray(expected_out))
    _close(case.state_of(layer), expected_state)
    # The state did change: the comparison is not of two initial states.
    changed = jax.tree.map(
        lambda a, b: not np.allclose(a, b), before, expected_state
    )
    assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_weights_are_named_by_path(kind):
    case = CASES[kind]
    layer = _built(case)
    assert sorted(w.path for w in layer.trainable_weights) == case.trainable
    non_trainable = sorted(w.path for w in layer.non_trainable_weights)
    assert non_trainable == case.non_trainable


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_config_round_trip_predicts_the_same(kind):
    case = CASES[kind]
    layer = _built(case)
    clone = type(layer).from_config(layer.get_config())
    clone(X)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(np.asarray(clone(X)), np.asarray(layer(X)))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_wrt_where_the_model_supports_it(kind):
    case = CASES[kind]
    supported = _built(case)._model.fine_tuning is not None
    assert supported == (case.wrt is not None)
    if not supported:
        return  # the kind's layer takes no `wrt`: nothing to choose from
    layer = _built(case, wrt=case.wrt)
    trainable = tuple(sorted(w.path for w in layer.trainable_weights))
    assert trainable == case.trains_with_wrt
    frozen = sorted(set(case.trainable) - set(case.trains_with_wrt))
    held = sorted(w.path for w in layer.non_trainable_weights)
    assert held == sorted(frozen + case.non_trainable)
    # The config keeps the choice.
    clone = type(layer).from_config(layer.get_config())
    clone(X)
    assert tuple(sorted(w.path for w in clone.trainable_weights)) == trainable


def test_wrt_is_refused_by_a_model_without_fine_tuning():
    model = CASES["functions"].make()._model
    with pytest.raises(TypeError, match="`wrt`"):
        ModelLayer(model, wrt=nnx.PathContains("head"))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_own_format_assignment_reaches_the_model(kind):
    case = CASES[kind]
    layer = _built(case)
    if layer._model.user_format is None:
        assert not hasattr(layer, "flax_variables")
        return  # no format of its own: weights are `params` / `state`
    before = np.asarray(layer(X))
    doubled = jax.tree.map(lambda v: np.asarray(v) * 2, layer.flax_variables)
    layer.flax_variables = doubled
    _close(jax.tree.map(np.asarray, layer.flax_variables), doubled)
    # The reference reads the module (NNX: written back) or the variables.
    expected, _ = case.reference(layer, X, False)
    after = np.asarray(layer(X))
    _close(after, np.asarray(expected))
    assert not np.allclose(after, before)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_keras_file_round_trip(kind, tmp_path):
    case = CASES[kind]
    inputs = keras.Input((4,))
    model = keras.Model(inputs, case.make()(inputs))
    model.compile("sgd", "mse")
    model.fit(X, data(6, 2, seed=1), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(
        loaded.predict(X, verbose=0), model.predict(X, verbose=0)
    )


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_stablehlo_export_serves_what_predict_returns(kind, tmp_path):
    case = CASES[kind]
    inputs = keras.Input((4,))
    model = keras.Model(inputs, case.make()(inputs))
    path = tmp_path / "m.stablehlo"
    keras_flax.export_stablehlo(model, path, verbose=False)
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    np.testing.assert_allclose(
        np.asarray(exported.call(X)),
        model.predict(X, verbose=0),
        rtol=1e-6,
        atol=1e-6,
    )


# The contract alone: a Model written by hand, as a new kind's adapter
# would write it.


def _hand_written_model():
    def apply(params, state, rng, inputs, training):
        return affine_call(params, state, inputs, training)

    def init(rng, inputs):
        return (*affine_init(rng, inputs), {})

    return Model(
        init=init,
        apply=apply,
        params=None,
        state=None,
        names=lambda trainable, parts: (
            parts if trainable else ("stats", *parts)
        ),
        rng=Rng(init=jax.random.key),
        takes_training=True,
        config=dict,
    )


def test_a_hand_written_model_trains_and_saves_as_its_functions(tmp_path):
    layer = ModelLayer(_hand_written_model(), seed=0, name="hand")
    layer(X)
    assert sorted(w.path for w in layer.weights) == [
        "hand/dense/b",
        "hand/dense/w",
        "hand/head/w",
        "hand/stats/mean",
    ]
    params = jax.tree.map(np.asarray, affine_init(jax.random.key(0), X)[0])
    weights = {w.path: np.asarray(w) for w in layer.weights}
    np.testing.assert_array_equal(weights["hand/dense/w"], params["dense"]["w"])
    expected, state = affine_call(params, {"mean": np.zeros(3)}, X, True)
    np.testing.assert_allclose(layer(X, training=True), expected, rtol=1e-6)
    np.testing.assert_allclose(
        layer.non_trainable_weights[0], state["mean"], rtol=1e-6
    )
    # Weights files hold it as any layer.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layer(inputs))
    model.save_weights(tmp_path / "w.weights.h5")
    other = ModelLayer(_hand_written_model(), seed=1, name="hand")
    copy = keras.Model(inputs, other(inputs))
    copy.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(
        copy.predict(X, verbose=0), model.predict(X, verbose=0)
    )


def test_the_model_is_frozen_keyword_only_and_shares_no_defaults():
    model = _hand_written_model()
    with pytest.raises(TypeError):
        Model(affine_init)  # positional construction
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.params = {}
    other = _hand_written_model()
    assert model.axes is not other.axes
    assert model.replace(params={"a": 1}).params == {"a": 1}
    assert model.params is None
