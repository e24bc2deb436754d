"""What a layer holds, as one value: `_weights.plan` and `Weights`, and the
two storages of `_variables.VariableTree` (plain and packed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import keras_flax
from keras_flax import _inputs
from keras_flax import _packing
from keras_flax import _variables
from keras_flax import _weights
from tests.conftest import data


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="encoder")(x)


def nothing_left_out(params):
    return frozenset()


def plan_of(layer, trees, spec=None):
    spec = spec or _inputs.from_shape((None, 5), "float32")
    return _weights.plan(
        layer._model,
        spec,
        trees,
        seed=0,
        layer_name=layer.name,
        axes={},
        left_out=nothing_left_out,
        saved_unused=_weights.no_unused(),
    )


def test_plan_of_init_is_the_modules_init_and_creates_nothing():
    layer = keras_flax.FlaxLayer(Encoder())
    plan = plan_of(layer, (None, None))
    model = layer._model
    expected = Encoder().init(model.rng.init(0), jnp.zeros((1, 5)))
    # Linen's parameters, in their collection.
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, plan.params, dict(expected)
    )
    assert plan.frozen == frozenset() and plan.unused == _weights.no_unused()
    # Pure: the same plan again, and the layer holds nothing.
    again = plan_of(layer, (None, None))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, again.params, plan.params
    )
    assert layer.weights == [] and not layer.built


def test_plan_of_given_trees_keeps_and_freezes_the_unused_leaves():
    variables = Encoder().init(jax.random.key(1), data(1, 5))
    head = {"kernel": data(3, 2)}
    params = {**variables["params"], "head": head}
    layer = keras_flax.FlaxLayer(Encoder())
    plan = plan_of(layer, ({"params": params}, None))
    assert plan.unused["params"] == {"params/head/kernel": ((3, 2), "float32")}
    assert plan.frozen == {"params/head/kernel"}
    assert plan.params["params"]["head"] is head  # the given arrays


def test_plan_refuses_given_trees_that_do_not_fit():
    variables = Encoder().init(jax.random.key(1), data(1, 7))
    layer = keras_flax.FlaxLayer(Encoder())
    with pytest.raises(ValueError, match=r"encoder/kernel"):
        plan_of(layer, (dict(variables), None))
    assert layer.weights == []


def test_empty_weights_hold_empty_trees():
    weights = _weights.Weights.empty(keras.layers.Layer())
    assert weights.holds_nothing
    assert weights.trees() == (None, None)
    assert weights.leaf_values() == []
    assert weights.specs(None) == ([], [])


TREE = {
    "a": np.arange(6, dtype="float32").reshape(2, 3),
    "b": {"c": np.ones((4,), "float32"), "i": np.arange(3, dtype="int32")},
    "d": np.full((2,), 5.0, "float32"),
}


def tree_of(storage, frozen=()):
    return _variables.VariableTree(
        keras.layers.Layer(name="holder"),
        TREE,
        trainable=True,
        name_fn=lambda parts: parts,
        frozen=frozen,
        storage=storage,
    )


def assert_tree(tree, expected):
    rebuilt = tree.rebuild(tree.values())
    jax.tree_util.tree_map(np.testing.assert_array_equal, rebuilt, expected)


@pytest.mark.parametrize("storage", [_variables.Plain, _packing.Packed])
def test_both_storages_hold_read_and_update_the_same_leaves(storage):
    tree = tree_of(storage)
    assert tree.paths == ["a", "b/c", "b/i", "d"]
    assert_tree(tree, TREE)
    old = tree.leaves(tree.values())
    new = list(old)
    new[1] = np.zeros((4,), "float32")
    tree.assign(tree.updates(new, old))
    assert_tree(tree, {**TREE, "b": {**TREE["b"], "c": np.zeros((4,))}})
    unchanged = tree.updates(old, old)
    assert unchanged == [None] * len(tree.variables)


def test_plain_storage_freezes_any_leaf():
    tree = tree_of(_variables.Plain)
    tree.freeze({"b/c"})
    trains = [v.trainable for v in tree.variables]
    assert trains == [True, False, True, True]


def test_packed_storage_freezes_leaves_when_it_packs_them():
    tree = tree_of(_packing.Packed, frozen={"d"})
    # float32 that trains, int32, float32 frozen: three packs.
    assert [v.trainable for v in tree.variables] == [True, True, False]
    assert [v.shape for v in tree.variables] == [(10,), (3,), (2,)]
    # A pack is frozen when every leaf it holds is; this one holds more.
    tree.freeze({"a"})
    assert tree.variables[0].trainable
    tree.freeze({"a", "b/c"})
    assert not tree.variables[0].trainable
    assert_tree(tree, TREE)
