"""FlaxLayer on linen modules, against plain module.init / apply / jax.grad."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

from keras_flax import FlaxLayer
from keras_flax import _private
from keras_flax import _rng
from tests import modules
from tests.conftest import assert_trees_close
from tests.conftest import data
from tests.conftest import flax_grads
from tests.conftest import keras_grads


def _flax_param_count(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))


def test_docs_cnn_in_functional_model_fits_and_matches_apply():
    x = data(64, 28, 28, 3)
    y = np.random.default_rng(1).integers(0, 10, 64)
    inputs = keras.Input((28, 28, 3))
    layer = FlaxLayer(modules.CNN(), seed=0)
    model = keras.Model(inputs, layer(inputs))
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy"
    )
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < before
    expected = modules.CNN().apply(layer.flax_variables, x[:8])
    np.testing.assert_allclose(
        model.predict(x[:8], verbose=0), expected, 1e-5, 1e-6
    )


def test_variables_from_init_give_module_apply_outputs_and_gradients():
    module = modules.MLP()
    x = data(5, 7)
    variables = module.init(jax.random.key(3), x)
    layer = FlaxLayer(module, variables=variables)
    np.testing.assert_allclose(layer(x), module.apply(variables, x), 1e-6, 1e-6)
    for got, want in zip(
        keras_grads(layer, x), flax_grads(module, variables, x), strict=True
    ):
        np.testing.assert_allclose(got, want, 1e-5, 1e-6)


def test_weights_are_named_after_flax_paths_and_counted_by_summary():
    module = modules.BatchNormDropout()
    variables = module.init(jax.random.key(0), data(2, 5))
    layer = FlaxLayer(module, variables=variables, name="bn")
    paths = sorted(w.path for w in layer.weights)
    assert "bn/Dense_0/kernel" in paths
    assert "bn/batch_stats/BatchNorm_0/mean" in paths
    assert not any("params" in p.split("/") for p in paths)
    assert all("seed" not in p for p in paths)  # seed state: not a weight
    model = keras.Sequential([keras.Input((5,)), layer])
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == _flax_param_count(variables["params"])
    assert model.count_params() == _flax_param_count(variables)


def test_flax_variables_go_back_to_plain_flax():
    module = modules.BatchNormOnly()
    layer = FlaxLayer(module, seed=1)
    x = data(8, 5)
    out = layer(x)
    variables = layer.flax_variables
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_allclose(out, module.apply(variables, x), 1e-6, 1e-6)
    reference = module.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(reference)


@pytest.mark.parametrize(
    "method",
    [
        "encode",
        modules.MLP().encode,
        lambda module, inputs: module.encode(inputs),
    ],
    ids=["name", "bound", "function"],
)
def test_method_as_name_bound_or_function(method):
    module = modules.MLP()
    x = data(3, 6)
    variables = module.init(jax.random.key(0), x)
    layer = FlaxLayer(module, method=method, variables=variables)
    want = module.apply(variables, x, method=modules.MLP.encode)
    np.testing.assert_allclose(layer(x), want, 1e-6, 1e-6)


def test_docs_two_input_example_with_wrapper_function():
    module = modules.TwoInputs()
    layer = FlaxLayer(module, method=modules.two_inputs_wrapper, seed=0)
    a, b = data(4, 3), data(4, 2, seed=1)
    inputs = (keras.Input((3,)), keras.Input((2,)))
    model = keras.Model(inputs, layer(inputs))
    variables = layer.flax_variables
    want = module.apply(variables, a, b, True, method=modules.TwoInputs.forward)
    np.testing.assert_allclose(
        model.predict((a, b), verbose=0), want, 1e-6, 1e-6
    )
    model.compile("sgd", "mse")
    model.fit((a, b), data(4, 3, seed=2), epochs=1, verbose=0)


@pytest.mark.parametrize(
    "module, shape",
    [
        (modules.MLP(), (7,)),
        (modules.Rank3(), (4, 6)),
        (modules.CNN(), (12, 12, 2)),
    ],
    ids=["rank2", "rank3", "rank4"],
)
def test_variables_none_builds_from_any_rank(module, shape):
    inputs = keras.Input(shape)
    layer = FlaxLayer(module, seed=0)
    model = keras.Model(inputs, layer(inputs))
    x = data(3, *shape)
    want = module.apply(layer.flax_variables, x)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, 1e-5, 1e-6)


def test_pytree_inputs_and_outputs():
    module = modules.TreeInputs()
    inputs = {
        "pair": (keras.Input((3,)), keras.Input((2, 2))),
        "single": keras.Input((1,), name="single"),
    }
    layer = FlaxLayer(module, seed=0)
    outputs = layer(inputs)
    model = keras.Model(inputs, outputs)
    x = {"pair": (data(4, 3), data(4, 2, 2)), "single": data(4, 1)}
    got = model.predict(x, verbose=0)
    want = module.apply(layer.flax_variables, x)
    assert_trees_close(tuple(got), want)


def test_integer_token_ids_build_with_integer_placeholders():
    inputs = keras.Input((10,), dtype="int32")
    layer = FlaxLayer(modules.Embedder(), seed=0)
    model = keras.Model(inputs, layer(inputs))
    ids = np.random.default_rng(0).integers(0, 50, (4, 10)).astype("int32")
    want = modules.Embedder().apply(layer.flax_variables, ids)
    np.testing.assert_allclose(model.predict(ids, verbose=0), want, 1e-6, 1e-6)


def test_module_needing_a_minimum_size_builds_with_unknown_dims():
    inputs = keras.Input((None, None, 3))
    layer = FlaxLayer(modules.NeedsSize(), seed=0)
    model = keras.Model(inputs, layer(inputs))
    x = data(2, 11, 13, 3)
    want = modules.NeedsSize().apply(layer.flax_variables, x)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, 1e-5, 1e-6)


def test_unknown_sizes_a_module_cannot_take_symbolically():
    # Position embeddings fix the number of patches: Keras' symbolic shape
    # inference fails; the output specs come from the sizes that work.
    module = modules.PatchEmbeddings()
    layer = FlaxLayer(module, seed=0)
    model = _unknown_size_model(layer, (None, None, 3), (None, 3))
    x = data(2, 2, 2, 3)  # one patch, as built (unknown sizes tried as 1)
    _assert_predicts_apply(model, module, layer.flax_variables, x)


def _unknown_size_model(layer, shape, output_shape):
    inputs = keras.Input(shape)
    outputs = layer(inputs)
    assert outputs.shape == output_shape
    return keras.Model(inputs, outputs)


def _assert_predicts_apply(model, module, variables, x):
    np.testing.assert_allclose(
        model.predict(x, verbose=0), module.apply(variables, x), 1e-5, 1e-6
    )


def test_output_sizes_that_follow_an_unknown_size_stay_unknown():
    module = modules.NumPyPositions()
    layer = FlaxLayer(module, seed=0)
    # Sizes 1 and 2 give output sizes 1 and 2.
    model = _unknown_size_model(layer, (None, 4), (None, None, 3))
    for length in (5, 6):
        x = data(2, length, 4)
        _assert_predicts_apply(model, module, layer.flax_variables, x)


def test_unknown_sizes_with_variables_made_for_one_image_size():
    module = modules.PatchEmbeddings()
    x = data(2, 8, 8, 3)
    variables = module.init(jax.random.key(0), x)  # 16 patches
    layer = FlaxLayer(module, variables=variables)
    model = _unknown_size_model(layer, (None, None, 3), (None, 3))
    _assert_predicts_apply(model, module, variables, x)


def test_sown_intermediates_are_not_weights_and_never_break_a_call():
    layer = FlaxLayer(modules.Sower(), seed=0)
    model = keras.Sequential([keras.Input((3,)), layer])
    assert {w.path.split("/")[-2] for w in layer.weights} == {
        "Dense_0",
        "Dense_1",
    }
    model.compile("sgd", "mse")
    model.fit(data(8, 3), data(8, 1), epochs=2, verbose=0)
    want = modules.Sower().apply(layer.flax_variables, data(2, 3))
    np.testing.assert_allclose(model.predict(data(2, 3), verbose=0), want, 1e-6)


def test_batch_stats_updated_like_apply_with_mutable_state():
    module = modules.BatchNormOnly()
    x = data(8, 5)
    variables = module.init(jax.random.key(0), x)
    layer = FlaxLayer(module, variables=variables)
    layer(x, training=True)
    _, mutated = module.apply(
        variables, x, training=True, mutable=nn.DenyList(["params"])
    )
    assert_trees_close(
        layer.flax_variables["batch_stats"], mutated["batch_stats"]
    )
    before = layer.flax_variables["batch_stats"]
    layer(x, training=False)
    assert_trees_close(layer.flax_variables["batch_stats"], before, 0, 0)


def test_fit_matches_a_hand_written_optax_loop():
    module = modules.BatchNormOnly()
    xs = [data(16, 5, seed=i) for i in range(4)]
    ys = [data(16, 1, seed=10 + i) for i in range(4)]
    variables = module.init(jax.random.key(0), xs[0])
    layer = FlaxLayer(module, variables=variables)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    for x, y in zip(xs, ys, strict=True):
        model.train_on_batch(x, y)

    optimizer = optax.sgd(0.05)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss(params):
            out, mutated = module.apply(
                {"params": params, "batch_stats": stats},
                x,
                training=True,
                mutable=["batch_stats"],
            )
            return jnp.mean((out - y) ** 2), mutated["batch_stats"]

        grads, stats = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state

    for x, y in zip(xs, ys, strict=True):
        params, stats, opt_state = step(params, stats, opt_state, x, y)
    got = layer.flax_variables
    assert_trees_close(got["params"], params, 1e-4, 1e-5)
    assert_trees_close(got["batch_stats"], stats, 1e-4, 1e-5)


def test_fit_moves_batch_stats_predict_and_evaluate_do_not():
    layer = FlaxLayer(modules.BatchNormDropout(), seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile("adam", "mse")
    x, y = data(32, 5) * 3 + 1, data(32, 2)
    stats = layer.flax_variables["batch_stats"]
    model.predict(x, verbose=0)
    model.evaluate(x, y, verbose=0)
    assert_trees_close(layer.flax_variables["batch_stats"], stats, 0, 0)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    moved = layer.flax_variables["batch_stats"]
    assert not np.allclose(
        moved["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"]
    )


def test_state_mutated_in_inference_is_written_back():
    module = modules.Counter()
    variables = module.init(jax.random.key(0), data(2, 3))
    layer = FlaxLayer(module, variables=variables)
    for _ in range(2):
        layer(data(2, 3))
        _, mutated = module.apply(
            variables, data(2, 3), mutable=nn.DenyList(["params"])
        )
        variables = {**variables, **mutated}
    assert int(variables["counter"]["count"]) == 3  # init counts too
    assert_trees_close(layer.flax_variables, variables, 0, 0)


def test_arrays_passed_as_variables_stay_valid_after_fit():
    module = modules.BatchNormOnly()
    variables = module.init(jax.random.key(0), data(2, 5))
    kernel = variables["params"]["Dense_0"]["kernel"]
    snapshot = np.asarray(kernel).copy()
    layer = FlaxLayer(module, variables=variables)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile("adam", "mse")
    model.fit(data(16, 5), data(16, 1), epochs=2, batch_size=4, verbose=0)
    assert not kernel.is_deleted()
    np.testing.assert_array_equal(np.asarray(kernel), snapshot)
    module.apply(variables, data(2, 5))  # still usable in plain Flax


def test_mixed_precision_runs_module_in_bfloat16_with_float32_variables():
    keras.config.set_dtype_policy("mixed_bfloat16")
    x = data(64, 8, 8, 1)
    y = np.random.default_rng(0).integers(0, 10, 64)
    inputs = keras.Input((8, 8, 1))
    layer = FlaxLayer(modules.CNN(), seed=0)
    outputs = layer(inputs)
    assert outputs.dtype == "bfloat16"
    assert {w.dtype for w in layer.weights} == {"float32"}
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy"
    )
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_eager_call_under_mixed_precision_runs_on_bfloat16_values():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = FlaxLayer(modules.MLP(), seed=0)
    x = data(4, 7)
    got = layer(x)
    variables = layer.flax_variables
    assert got.dtype == jnp.bfloat16
    assert {w.dtype for w in layer.weights} == {"float32"}
    as_bf16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables)
    want = modules.MLP().apply(as_bf16, x.astype(jnp.bfloat16))
    np.testing.assert_array_equal(
        np.asarray(got, "float32"), np.asarray(want, "float32")
    )


def test_eager_call_in_a_stateless_scope_uses_the_scope_values():
    layer = FlaxLayer(modules.MLP(), seed=0)
    x = data(4, 7)
    layer(x)
    variables = layer.flax_variables
    doubled = jax.tree.map(lambda v: 2 * v, variables)
    swaps = [(w, 2 * w.value) for w in layer.weights]
    with keras.StatelessScope(state_mapping=swaps):
        got = layer(x)
    want = modules.MLP().apply(doubled, x)
    np.testing.assert_allclose(got, want, 1e-6, 1e-6)
    # Outside the scope the layer's own values are back.
    np.testing.assert_allclose(
        layer(x), modules.MLP().apply(variables, x), 1e-6, 1e-6
    )


def test_eager_calls_compile_once_per_input_signature():
    traces = modules.TraceCounter()
    layer = FlaxLayer(modules.MLP(), method=traces.without_training, seed=0)
    layer(data(4, 7))
    built = traces.count
    layer(data(4, 7, seed=1))
    assert traces.count == built  # the compiled program, cached
    layer(data(9, 7))
    assert traces.count == built + 1  # one trace for the new signature
    layer(data(9, 7, seed=1))
    assert traces.count == built + 1


def _jit_names(jaxpr):
    """Names of the jitted calls anywhere in `jaxpr`, nested ones too."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("jit", "pjit"):
            names.append(eqn.params.get("name"))
        for sub in _sub_jaxprs(eqn.params):
            names.extend(_jit_names(sub))
    return sorted(names)


def _sub_jaxprs(params):
    core = jax.extend.core
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def test_traced_calls_are_inlined_not_nested_programs():
    # Inside an outer trace (Keras' compiled steps) the forward pass is
    # traced inline; eager calls use the cached compiled program. Inline,
    # the layer's trace holds the jitted calls the module's own `apply`
    # holds (activations such as `relu` are jitted), and no more.
    traces = modules.TraceCounter()
    method = traces.without_training
    layer = FlaxLayer(modules.MLP(), method=method, seed=0)
    x = data(4, 7)
    layer(x)
    ours = jax.make_jaxpr(lambda x: layer(x))(x)
    variables = layer.flax_variables
    plain = jax.make_jaxpr(
        lambda x: modules.MLP().apply(variables, x, method=method)
    )(x)
    assert _jit_names(ours.jaxpr) == _jit_names(plain.jaxpr)
    traced = traces.count
    layer(x)  # the eager program is still the cached one
    assert traces.count == traced
    want = modules.MLP().apply(layer.flax_variables, x)
    np.testing.assert_allclose(jax.jit(lambda x: layer(x))(x), want, 1e-6, 1e-6)


def test_training_flag_under_another_name_warns_with_the_fix():
    with pytest.warns(
        UserWarning,
        match=r"(?s)`train` flag .*return module\(inputs, train=training\)",
    ):
        FlaxLayer(modules.TrainFlag())


class _ManyLeaves(nn.Module):
    """More leaves than one compiled init program pays for."""

    @nn.compact
    def __call__(self, x):
        for _ in range(40):
            x = nn.LayerNorm()(nn.Dense(8)(x))
        return x


@pytest.mark.parametrize(
    "module, kwargs",
    [(modules.BatchNormDropout(), {"training": True}), (_ManyLeaves(), {})],
    ids=["few leaves", "many leaves"],
)
def test_initial_variables_are_module_init_with_the_layer_rngs(module, kwargs):
    # Few leaves: one program compiled with XLA's cheapest options; many:
    # the traced program op by op. Either way Flax's own `init` values.
    layer = FlaxLayer(module, seed=11)
    x = np.ones((2, 8), "float32")
    layer(x)

    rngs = _rng.stream_keys(_rng.key_from_seed(11), _rng.INIT_STREAMS)
    expected = module.init(rngs, x, **kwargs)

    assert_trees_close(layer.flax_variables, expected, rtol=1e-6, atol=1e-7)


def _init_like(key, x):
    # A nested jitted initialiser, then a forward pass whose result is
    # dropped (as in a linen `init`) and a callback on that dead branch.
    kernel = jax.jit(jax.random.truncated_normal, static_argnums=(3,))(
        key, -2.0, 2.0, (x.shape[-1], 4)
    )
    dead = jax.pure_callback(
        lambda y: _calls.append(1) or y,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        x @ kernel @ kernel.T,
    )
    del dead
    jax.debug.callback(lambda: _effects.append(1))
    return {"kernel": kernel, "bias": jnp.zeros(4)}


_calls, _effects = [], []


def test_op_by_op_init_skips_dead_work_and_keeps_effects():
    _calls.clear()
    _effects.clear()
    key, x = jax.random.key(3), jnp.ones((2, 5))
    traced = jax.jit(_init_like).trace(key, x)
    got = _private.run_op_by_op(traced.jaxpr, [key, x])
    assert _calls == [] and _effects == [1]
    want = jax.extend.core.jaxpr_as_fun(traced.jaxpr)(key, x)
    assert _calls == [1]  # the plain evaluator does run the dead branch
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_op_by_op_init_falls_back_to_the_plain_evaluator(monkeypatch):
    def broken(*args):
        raise RuntimeError("an equation this evaluator does not know")

    monkeypatch.setattr(_private, "_evaluate", broken)
    key, x = jax.random.key(3), jnp.ones((2, 5))
    traced = jax.jit(_init_like).trace(key, x)
    got = _private.run_op_by_op(traced.jaxpr, [key, x])
    want = jax.extend.core.jaxpr_as_fun(traced.jaxpr)(key, x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
