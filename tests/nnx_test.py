"""FlaxLayer on NNX modules, against plain NNX on the same state."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import _rng
from tests import nnx_modules as m
from tests.conftest import data

CASES = {
    "linear": (lambda r: nnx.Linear(4, 3, rngs=r), (4,)),
    "conv-bn-dropout": (m.ConvBatchNormDropout, (6, 6, 1)),
    "attention": (m.Attention, (5, 8)),
    "lstm": (m.Recurrent, (7, 3)),
    "custom-variable": (m.WithCustomVariable, (4,)),
    "blocks": (m.Blocks, (4,)),
    "array-attribute": (m.WithArrayAttribute, (4,)),
    "scanned-blocks": (lambda r: m.ScannedBlocks(3, 4, rngs=r), (4,)),
}


def _make(case, seed=0):
    make, shape = CASES[case]
    return make(nnx.Rngs(seed)), shape


def _eval_copy(module):
    copy = nnx.clone(module)
    copy.eval()
    return copy


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_the_module_in_eval_mode(case):
    module, shape = _make(case)
    want = _eval_copy(module)(data(3, *shape))
    layer = FlaxLayer(module)
    np.testing.assert_allclose(layer(data(3, *shape)), want, 1e-5, 1e-6)


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_nnx_grad(case):
    module, shape = _make(case)
    x = data(3, *shape)
    reference = _eval_copy(module)
    want = nnx.grad(lambda model: jnp.sum(model(x) ** 2))(reference)
    layer = FlaxLayer(module)
    layer(x)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable):
        y, _ = layer.stateless_call(trainable, non_trainable, x)
        return jnp.sum(y**2)

    got = jax.grad(loss)(trainable)
    want = jax.tree.leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, 1e-4, 1e-5)


@pytest.mark.parametrize("case", CASES)
def test_fit_matches_a_hand_written_nnx_optimizer_loop(case):
    module, shape = _make(case)
    xs = [data(8, *shape, seed=i) for i in range(3)]
    out_dim = _eval_copy(module)(xs[0]).shape[-1]
    ys = [data(8, out_dim, seed=10 + i) for i in range(3)]

    reference = nnx.clone(module)
    reference.train()
    optimizer = nnx.Optimizer(reference, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss(model):
            return jnp.mean((model(x) - y) ** 2)

        optimizer.update(model, nnx.grad(loss)(model))

    for x, y in zip(xs, ys, strict=True):
        step(reference, optimizer, x, y)

    layer = FlaxLayer(module)
    model = keras.Sequential([keras.Input(shape), layer])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    losses = [
        float(model.train_on_batch(x, y)) for x, y in zip(xs, ys, strict=True)
    ]
    assert np.all(np.isfinite(losses))
    got = nnx.state(layer.module)  # synced on access
    want = nnx.state(reference)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(g.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_allclose(g, w, 1e-4, 1e-5)


def test_a_short_fit_lowers_the_loss():
    module, shape = _make("conv-bn-dropout")
    layer = FlaxLayer(module)
    model = keras.Sequential([keras.Input(shape), layer])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = data(64, *shape), data(64, 3, seed=1)
    history = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_names_follow_nnx_paths_and_state_is_non_trainable():
    module, _ = _make("conv-bn-dropout")
    layer = FlaxLayer(module, name="net")
    trainable = sorted(w.path for w in layer.trainable_weights)
    non_trainable = sorted(w.path for w in layer.non_trainable_weights)
    assert "net/conv/kernel" in trainable and "net/bn/scale" in trainable
    assert non_trainable == [
        "net/bn/mean",
        "net/bn/var",
        "net/dropout/rngs/count",
        "net/dropout/rngs/key",
    ]
    blocks = FlaxLayer(m.Blocks(nnx.Rngs(0)), name="b")
    assert "b/blocks/0/linear/kernel" in [w.path for w in blocks.weights]
    params = nnx.state(module, nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert sum(int(np.prod(w.shape)) for w in layer.trainable_weights) == count


def test_batch_stats_move_in_fit_and_not_in_predict():
    module, shape = _make("conv-bn-dropout")
    layer = FlaxLayer(module)
    model = keras.Sequential([keras.Input(shape), layer])
    model.compile("adam", "mse")
    x = data(16, *shape) * 2 + 1
    mean = np.asarray(layer.state["bn"]["mean"].value)
    model.predict(x, verbose=0)
    model.evaluate(x, data(16, 3), verbose=0)
    np.testing.assert_array_equal(layer.state["bn"]["mean"].value, mean)
    model.fit(x, data(16, 3), epochs=1, batch_size=8, verbose=0)
    assert not np.allclose(layer.state["bn"]["mean"].value, mean)


def test_dropout_draws_fresh_masks_every_training_step():
    layer = FlaxLayer(m.DropoutOnly(nnx.Rngs(0)))
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = data(8, 4), data(8, 16)
    # The weights stay put: losses differ only through the masks.
    losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
    assert len(set(losses)) == 3
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_custom_variable_type_is_state_updated_after_calls():
    module, _ = _make("custom-variable")
    layer = FlaxLayer(module, name="c")
    assert [w.path for w in layer.non_trainable_weights] == ["c/calls"]
    layer(data(2, 4))
    layer(data(2, 4), training=True)
    assert int(layer.state["calls"].value) == 2
    assert int(layer.module.calls[...]) == 2


def test_module_holds_the_trained_values_after_fit():
    module, shape = _make("conv-bn-dropout")
    layer = FlaxLayer(module)
    model = keras.Sequential([keras.Input(shape), layer])
    model.compile("adam", "mse")
    x = data(32, *shape)
    model.fit(x, data(32, 3), epochs=2, batch_size=8, verbose=0)
    # The user's own reference, never read through the layer.
    module.eval()
    np.testing.assert_allclose(
        module(x), model.predict(x, verbose=0), 1e-5, 1e-6
    )
    kernel = layer.state["bn"]["mean"].value
    np.testing.assert_array_equal(module.bn.mean[...], kernel)
    assert layer.module is module
    model.fit(x, data(32, 3), epochs=1, verbose=0)  # module arrays: copies
    assert not module.bn.mean[...].is_deleted()


def test_load_weights_and_sync_module_update_the_module(tmp_path):
    module, shape = _make("conv-bn-dropout")
    layer = FlaxLayer(module)
    model = keras.Sequential([keras.Input(shape), layer])
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    kernel = np.asarray(module.conv.kernel[...]).copy()
    layer.params["conv"]["kernel"].assign(np.zeros_like(kernel))
    np.testing.assert_array_equal(module.conv.kernel[...], 0.0)
    model.load_weights(path)
    np.testing.assert_array_equal(module.conv.kernel[...], kernel)
    module.conv.kernel[...] = jnp.ones_like(kernel)
    layer.sync_module()  # back to the layer's values
    np.testing.assert_array_equal(module.conv.kernel[...], kernel)


def test_training_maps_onto_train_and_eval_modes_without_user_calls():
    module, shape = _make("conv-bn-dropout")
    module.eval()  # the user's mode does not matter
    layer = FlaxLayer(module)
    x = data(4, *shape)
    reference = nnx.clone(module)
    reference.train()
    np.testing.assert_allclose(
        layer(x, training=True), reference(x), 1e-5, 1e-6
    )
    assert module.dropout.deterministic  # the user's module is untouched


@pytest.mark.parametrize(
    "method",
    [
        "hidden",
        m.MLP(nnx.Rngs(0)).hidden,
        lambda module, inputs: module.hidden(inputs),
    ],
    ids=["name", "bound", "function"],
)
def test_method_as_name_or_function(method):
    module = m.MLP(nnx.Rngs(0))
    layer = FlaxLayer(module, method=method)
    x = data(3, 4)
    np.testing.assert_allclose(layer(x), module.hidden(x), 1e-6)


def test_method_taking_training_gets_it():
    module = m.TrainingArgument(nnx.Rngs(0))
    layer = FlaxLayer(module)
    x = data(2, 4)
    np.testing.assert_allclose(
        layer(x, training=True), module(x, training=True)
    )
    np.testing.assert_allclose(layer(x), module(x))


def test_seed_reseeds_the_module_streams_reproducibly():
    def first_step_loss(seed):
        module, shape = _make("conv-bn-dropout", seed=0)
        layer = FlaxLayer(module, seed=seed)
        model = keras.Sequential([keras.Input(shape), layer])
        model.compile(keras.optimizers.SGD(0.0), "mse")
        return float(model.train_on_batch(data(8, *shape), data(8, 3)))

    assert first_step_loss(5) == first_step_loss(5)
    assert first_step_loss(5) != first_step_loss(6)


def test_bad_nnx_arguments():
    with pytest.raises(
        TypeError,
        match=r"instantiate it: FlaxLayer\(MLP\(\.\.\., "
        r"rngs=nnx.Rngs\(0\)\)\)",
    ):
        FlaxLayer(m.MLP)
    module = m.MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`variables` is for linen modules"):
        FlaxLayer(module, variables={"params": {}})
    with pytest.raises(ValueError, match=r"`rng_collections` is for linen"):
        FlaxLayer(module, rng_collections=("dropout",))
    with pytest.raises(ValueError, match=r"names no method of MLP.*'hidden'"):
        FlaxLayer(module, method="encode")
    with pytest.raises(ValueError, match=r"must take the inputs"):
        FlaxLayer(module, method=lambda module: module)


def test_save_weights_and_load_weights(tmp_path):
    def build(seed):
        module, shape = _make("conv-bn-dropout", seed=seed)
        model = keras.Sequential([keras.Input(shape), FlaxLayer(module)])
        return model, shape

    model, shape = build(0)
    model.compile("adam", "mse")
    model.fit(data(16, *shape), data(16, 3), epochs=1, verbose=0)
    path = str(tmp_path / "nnx.weights.h5")
    model.save_weights(path)
    fresh, _ = build(1)
    fresh.load_weights(path)
    x = data(4, *shape)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), fresh.predict(x, verbose=0)
    )


def test_plain_array_attributes_are_kept_and_written_back(tmp_path):
    module = m.WithArrayAttribute(nnx.Rngs(0))
    layer = FlaxLayer.from_nnx(m.WithArrayAttribute, rngs=nnx.Rngs(0))
    assert sorted(w.path for w in layer.non_trainable_weights) == [
        f"{layer.name}/calls",
        f"{layer.name}/table",
    ]
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(data(16, 4), data(16, 3), batch_size=8, epochs=2, verbose=0)
    trained = layer.module
    assert int(trained.calls) == 4  # one per step, as in plain NNX
    np.testing.assert_array_equal(trained.table, module.table)
    assert not np.array_equal(trained.linear.kernel, module.linear.kernel)

    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = data(3, 4, seed=2)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    assert int(loaded.layers[0].module.calls) == int(layer.module.calls)


def _stream_key(seed, stream):
    """The key `seed=` gives a stream (its id folded into the seed)."""
    return jax.random.fold_in(jax.random.key(seed), _rng.stream_id(stream))


def test_seed_reseeds_stacked_streams_one_key_per_slice():
    x = data(4, 4)
    layer = FlaxLayer(m.ScannedBlocks(3, 4, rngs=nnx.Rngs(0)), seed=7)
    # Ground truth: Flax's own reseeding of stacked streams, as split_rngs
    # made them (one key per slice).
    reference = m.ScannedBlocks(3, 4, rngs=nnx.Rngs(0))
    # (Dropout draws from the `nnx.Rngs(0)` "default" stream.)
    nnx.reseed(
        reference, default=_stream_key(7, "default"), policy="match_shape"
    )
    reference.train()
    np.testing.assert_allclose(
        layer(x, training=True), reference(x), 1e-5, 1e-6
    )
    keys = layer.state["blocks"]["dropout"]["rngs"]["key"].value
    assert len({tuple(k) for k in np.asarray(keys).tolist()}) == 3
    other = FlaxLayer(m.ScannedBlocks(3, 4, rngs=nnx.Rngs(0)), seed=8)
    assert not np.allclose(other(x, training=True), layer(x, training=True))


def test_stacked_streams_without_flax_reseed_policies_are_refused(
    monkeypatch,
):
    def reseed(node, /, **stream_keys):  # a Flax without `policy`
        raise AssertionError("not reached")

    monkeypatch.setattr(nnx, "reseed", reseed)
    with pytest.raises(
        ValueError,
        match=r"cannot reseed stacked streams.*blocks/dropout/rngs.*"
        r"Leave `seed` out",
    ):
        FlaxLayer(m.ScannedBlocks(3, 4, rngs=nnx.Rngs(0)), seed=7)
    x = data(2, 4)
    assert FlaxLayer(m.ScannedBlocks(3, 4, rngs=nnx.Rngs(0)))(x).shape == (2, 4)


class CountsItsBatch(nnx.Module):
    """Calls `len()` on its batch: it cannot run with an unknown one."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear(x) * jnp.arange(len(x))[:, None]


def test_a_module_needing_its_batch_size_is_told_to_give_it():
    with pytest.raises(
        ValueError,
        match=r"unknown batch size.*\(None, 4\).*batch_size=n",
    ):
        keras.Sequential(
            [keras.Input((4,)), FlaxLayer(CountsItsBatch(nnx.Rngs(0)))]
        )
    module = CountsItsBatch(nnx.Rngs(0))
    reference = nnx.clone(module)
    model = keras.Sequential(
        [keras.Input((4,), batch_size=3), FlaxLayer(module)]
    )
    x = np.ones((3, 4), "float32")
    np.testing.assert_allclose(
        model.predict(x, verbose=0), reference(x), rtol=1e-6
    )
