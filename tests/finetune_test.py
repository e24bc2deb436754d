"""Fine-tuning: `wrt` chooses what trains, `flax_variables` is assigned,
Orbax checkpoints go both ways. Each against plain Flax / Optax on the
same variables and batches."""

import importlib.util
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import OptaxOptimizer
from tests import modules
from tests import nnx_modules
from tests.conftest import assert_trees_close
from tests.conftest import data

X, Y = data(32, 4), data(32, 3, seed=1)
LR = 0.05


def fitted(layer, optimizer=None, epochs=2):
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(optimizer or keras.optimizers.SGD(LR), "mse")
    model.fit(X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return model


def batches(epochs=2):
    for _ in range(epochs):
        for i in range(0, len(X), 8):
            yield X[i : i + 8], Y[i : i + 8]


def names(variables, layer):
    return sorted(v.path.split(f"{layer.name}/", 1)[1] for v in variables)


def trainable_names(layer):
    return names(layer.trainable_weights, layer)


def frozen_names(layer):
    return names(layer.non_trainable_weights, layer)


def pure(state):
    """An NNX state as a pure dict, RNG keys as their key data."""
    return jax.tree_util.tree_map(
        lambda a: (
            jax.random.key_data(a)
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
            else a
        ),
        nnx.to_pure_dict(state),
    )


def arrays(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def values_by_path(module):
    """The module's parameter values now, by path (NumPy copies: the
    module shares its arrays with the layer, whose `fit` donates them)."""
    return {
        path: np.array(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


# 1. `wrt`: what trains.


def test_lora_fit_equals_nnx_optimizer_with_lora_wrt():
    layer = FlaxLayer(nnx_modules.LoRAMLP(nnx.Rngs(0)), wrt=nnx.LoRAParam)
    before = values_by_path(layer.module)
    fitted(layer)

    # Plain NNX on the same batches.
    model = nnx_modules.LoRAMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.LoRAParam)

    def loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    for x, y in batches():
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model, x, y
        )
        optimizer.update(model, grads)

    assert_trees_close(
        nnx.to_pure_dict(nnx.state(layer.module)),
        nnx.to_pure_dict(nnx.state(model)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert_trees_close(layer.flax_variables, nnx.state(model), 1e-5, 1e-5)
    # Only the adapters moved; the base weights are bit for bit as before.
    after = values_by_path(layer.module)
    for path, old in before.items():
        if "lora" in path:
            assert not np.array_equal(old, after[path]), path
        else:
            np.testing.assert_array_equal(old, after[path])


def test_linen_frozen_backbone_equals_optax_over_the_selected_leaves():
    wrt = nnx.Not(nnx.PathContains("backbone"))
    layer = FlaxLayer(modules.BackboneHead(), wrt=wrt, seed=0)
    layer(X[:1])
    initial = layer.flax_variables
    fitted(layer, OptaxOptimizer(optax.adam(1e-2)))

    # Plain Optax over the selected leaves only.
    module = modules.BackboneHead()
    frozen = {"backbone": initial["params"]["backbone"]}
    selected = {k: v for k, v in initial["params"].items() if k != "backbone"}
    tx = optax.adam(1e-2)
    state = tx.init(selected)

    def loss(selected, x, y):
        out = module.apply({"params": {**frozen, **selected}}, x)
        return jnp.mean((out - y) ** 2)

    for x, y in batches():
        grads = jax.grad(loss)(selected, x, y)
        updates, state = tx.update(grads, state, selected)
        selected = optax.apply_updates(selected, updates)

    assert_trees_close(
        layer.flax_variables, {"params": {**frozen, **selected}}, 1e-5, 1e-6
    )
    assert_trees_close(
        layer.flax_variables["params"]["backbone"], frozen["backbone"], 0, 0
    )


NNX_FILTERS = {
    "type": nnx.LoRAParam,
    "path": nnx.PathContains("linear2"),
    "any": nnx.Any(nnx.LoRAParam, nnx.PathContains("bias")),
    "all": nnx.All(nnx.LoRAParam, nnx.PathContains("linear1")),
    "not": nnx.Not(nnx.LoRAParam),
    "list": [nnx.PathContains("linear1"), nnx.LoRAParam],
    "function": lambda path, value: value.get_value().ndim == 2,
    "everything": ...,
}


@pytest.mark.parametrize("name", list(NNX_FILTERS))
def test_nnx_filters_select_what_nnx_selects(name):
    wrt = NNX_FILTERS[name]
    module = nnx_modules.LoRAMLP(nnx.Rngs(0))
    # NNX's own selection: the parameters `nnx.Optimizer(wrt=...)` trains.
    selected = nnx.state(module, nnx.All(nnx.Param, wrt))
    want = sorted(
        "/".join(map(str, path)) for path, _ in nnx.to_flat_state(selected)
    )
    layer = FlaxLayer(module, wrt=wrt, name="m")
    assert trainable_names(layer) == want
    everything = {
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module))
    }
    assert set(frozen_names(layer)) == everything - set(want)


def test_a_string_is_a_tag_as_in_nnx():
    layer = FlaxLayer(nnx_modules.Tagged(nnx.Rngs(0)), wrt="tune", name="m")
    assert trainable_names(layer) == ["adapter"]
    assert frozen_names(layer) == ["base"]


LINEN_FILTERS = {
    "path": (nnx.PathContains("head"), ["head/bias", "head/kernel"]),
    "not": (
        nnx.Not(nnx.PathContains("backbone")),
        ["head/bias", "head/kernel", "middle/bias", "middle/kernel"],
    ),
    "all": (
        nnx.All(nnx.PathContains("kernel"), nnx.PathContains("head")),
        ["head/kernel"],
    ),
    "any": (
        nnx.Any(nnx.PathContains("head"), nnx.PathContains("middle")),
        ["head/bias", "head/kernel", "middle/bias", "middle/kernel"],
    ),
    "path_in": (nnx.filterlib.PathIn(("middle", "bias")), ["middle/bias"]),
    "function": (lambda path, value: value.ndim == 1, [
        "backbone/bias", "head/bias", "middle/bias"
    ]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LINEN_FILTERS))
def test_linen_filters_see_the_path_inside_params(name):
    wrt, want = LINEN_FILTERS[name]
    layer = FlaxLayer(modules.BackboneHead(), wrt=wrt, seed=0, name="m")
    layer(X[:1])
    assert trainable_names(layer) == want
    params = flax.traverse_util.flatten_dict(layer.flax_variables["params"])
    assert sorted(trainable_names(layer) + frozen_names(layer)) == sorted(
        "/".join(path) for path in params
    )


def test_a_function_filter_is_given_what_nnx_and_linen_hold():
    seen = {}

    def record(path, value):
        seen[path] = value
        return True

    FlaxLayer(nnx_modules.LoRAMLP(nnx.Rngs(0)), wrt=record)
    assert isinstance(seen["linear1", "lora", "lora_a"], nnx.LoRAParam)
    assert isinstance(seen["linear1", "kernel"], nnx.Param)
    seen.clear()
    FlaxLayer(modules.BackboneHead(), wrt=record, seed=0)(X[:1])
    assert sorted(seen) == [
        (name, leaf)
        for name in ("backbone", "head", "middle")
        for leaf in ("bias", "kernel")
    ]
    assert seen["head", "kernel"].shape == (8, 3)


LORA_NAMES = [
    "linear1/lora/lora_a", "linear1/lora/lora_b",
    "linear2/lora/lora_a", "linear2/lora/lora_b",
]  # fmt: skip


def test_left_out_parameters_keep_their_names_and_places():
    full = FlaxLayer(nnx_modules.LoRAMLP(nnx.Rngs(0)), name="m")
    lora = FlaxLayer(
        nnx_modules.LoRAMLP(nnx.Rngs(0)), wrt=nnx.LoRAParam, name="m"
    )
    assert {v.path for v in full.weights} == {v.path for v in lora.weights}
    assert trainable_names(lora) == LORA_NAMES
    assert frozen_names(lora) == [
        "linear1/bias", "linear1/kernel", "linear2/bias", "linear2/kernel"
    ]  # fmt: skip
    # `flax_variables` has them where they were: `nnx.Param`s.
    state = lora.flax_variables
    assert isinstance(state["linear1"]["kernel"], nnx.Param)
    assert_trees_close(state, full.flax_variables, 0, 0)
    # `layer.trainable` toggled back keeps the choice.
    lora.trainable = False
    assert lora.trainable_weights == []
    lora.trainable = True
    assert trainable_names(lora) == LORA_NAMES


def test_summary_counts_left_out_parameters_as_non_trainable():
    layer = FlaxLayer(
        nnx_modules.LoRAMLP(nnx.Rngs(0)), wrt=nnx.LoRAParam, name="m"
    )
    model = keras.Sequential([keras.Input((4,)), layer])
    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    text = "\n".join(lines)
    base = 4 * 8 + 8 + 8 * 3 + 3
    adapters = (4 * 2 + 2 * 8) + (8 * 2 + 2 * 3)
    assert f"Trainable params: {adapters} " in text
    assert f"Non-trainable params: {base} " in text


def test_saved_with_the_choice_and_loaded_with_it(tmp_path):
    layer = FlaxLayer.from_nnx(
        nnx_modules.LoRAMLP,
        nnx.Rngs(0),
        layer_kwargs={"wrt": nnx.Any(nnx.LoRAParam, "tune"), "name": "m"},
    )
    model = fitted(layer)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    (again,) = loaded.layers
    assert trainable_names(again) == trainable_names(layer)
    assert repr(again.wrt) == repr(nnx.Any(nnx.LoRAParam, "tune"))
    np.testing.assert_array_equal(
        loaded.predict(X, verbose=0), model.predict(X, verbose=0)
    )


def test_linen_choice_by_importable_function_round_trips(tmp_path):
    layer = FlaxLayer(modules.BackboneHead(), wrt=modules.trains_head, seed=0)
    model = fitted(layer, epochs=1)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert trainable_names(loaded.layers[0]) == trainable_names(layer)
    assert loaded.layers[0].wrt is modules.trains_head
    np.testing.assert_array_equal(
        loaded.predict(X, verbose=0), model.predict(X, verbose=0)
    )


def test_weights_files_do_not_depend_on_what_trains(tmp_path):
    full = fitted(FlaxLayer(nnx_modules.LoRAMLP(nnx.Rngs(0)), name="m"))
    full.save_weights(tmp_path / "full.weights.h5")
    lora = FlaxLayer(
        nnx_modules.LoRAMLP(nnx.Rngs(1)), wrt=nnx.LoRAParam, name="m"
    )
    model = fitted(lora, epochs=1)
    model.load_weights(tmp_path / "full.weights.h5")
    assert_trees_close(lora.flax_variables, full.layers[0].flax_variables, 0, 0)
    # And back: the LoRA model's file into a model training everything.
    fitted(lora, epochs=1)
    model.save_weights(tmp_path / "lora.weights.h5")
    full.load_weights(tmp_path / "lora.weights.h5")
    assert_trees_close(full.layers[0].flax_variables, lora.flax_variables, 0, 0)


def test_keras_trainable_false_freezes_one_more_weight():
    layer = FlaxLayer(
        nnx_modules.LoRAMLP(nnx.Rngs(0)), wrt=nnx.LoRAParam, name="m"
    )
    (lora_b,) = [v for v in layer.weights if v.path == "m/linear2/lora/lora_b"]
    lora_b.trainable = False
    before = values_by_path(layer.module)
    fitted(layer, epochs=1)
    after = values_by_path(layer.module)
    for path, old in before.items():
        moved = not np.array_equal(old, after[path])
        assert moved == ("lora" in path and path[0] != "linear2"), path


@keras.saving.register_keras_serializable(package="keras_flax_tests")
def registered_filter(path, value):
    return "lora" in path


def test_a_registered_function_filter_round_trips():
    layer = FlaxLayer.from_nnx(
        nnx_modules.LoRAMLP,
        nnx.Rngs(0),
        layer_kwargs={"wrt": registered_filter, "name": "m"},
    )
    again = FlaxLayer.from_config(layer.get_config())
    assert again.wrt is registered_filter
    assert trainable_names(again) == trainable_names(layer)


def test_packed_weights_train_only_the_choice():
    def make(pack):
        return FlaxLayer(
            modules.BackboneHead(),
            wrt=nnx.PathContains("head"),
            seed=0,
            pack_weights=pack,
        )

    plain, packed = make(False), make(True)
    fitted(plain)
    fitted(packed)
    frozen = packed.non_trainable_weights
    assert frozen and all("frozen" in v.path for v in frozen), frozen
    assert_trees_close(packed.flax_variables, plain.flax_variables, 1e-6, 1e-6)


# Bad filters: refused at once with the fix; the module stays usable.


def test_variable_types_are_refused_for_linen_with_the_fix():
    with pytest.raises(TypeError) as error:
        FlaxLayer(modules.BackboneHead(), wrt=nnx.Any(nnx.Param, "head"))
    message = str(error.value)
    assert "`wrt` chooses linen parameters by their path" in message
    assert "Received: wrt=Any(" in message
    assert "OfType(<class 'flax.nnx.variablelib.Param'>)" in message
    assert (
        "Fix: filter on paths, e.g. `wrt=nnx.PathContains('head')`" in message
    )
    layer = FlaxLayer(modules.BackboneHead(), wrt=nnx.PathContains("head"))
    assert layer(X).shape == (32, 3)


@pytest.mark.parametrize(
    "wrt, expected",
    [
        (3, "must be a Flax NNX filter"),
        ({"head": True}, "must be a Flax NNX filter"),
        ([nnx.LoRAParam, 2.5], "must be a Flax NNX filter"),
        (lambda path: True, "are called as `fn(path, value)`"),
    ],
)
def test_what_is_not_a_filter_is_refused(wrt, expected):
    module = nnx_modules.LoRAMLP(nnx.Rngs(0))
    with pytest.raises(TypeError) as error:
        FlaxLayer(module, wrt=wrt)
    message = str(error.value)
    assert expected in message
    assert "Received: wrt=" in message
    assert "Fix" in message or "Pass an NNX filter" in message
    assert FlaxLayer(module, wrt=nnx.LoRAParam)(X).shape == (32, 3)


def test_a_filter_selecting_nothing_is_refused_naming_the_candidates():
    module = nnx_modules.LoRAMLP(nnx.Rngs(0))
    before = arrays(nnx.state(module))
    with pytest.raises(ValueError) as error:
        FlaxLayer(module, wrt=nnx.PathContains("head"))
    message = str(error.value)
    assert "`wrt` selects none of the parameters of LoRAMLP" in message
    assert "Received: wrt=PathContains('head'" in message
    assert "linear1/kernel" in message and "linear2/lora/lora_b" in message
    assert "Fix: pass a filter matching some of them" in message
    for a, b in zip(before, arrays(nnx.state(module)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert FlaxLayer(module, wrt=nnx.LoRAParam)(X).shape == (32, 3)


def test_linen_given_variables_selecting_nothing_is_refused_at_once():
    variables = modules.BackboneHead().init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="backbone/bias, backbone/kernel"):
        FlaxLayer(
            modules.BackboneHead(),
            variables=variables,
            wrt=nnx.PathContains("Dense_0"),
        )


def test_linen_selecting_nothing_is_refused_at_build_leaving_nothing():
    layer = FlaxLayer(modules.BackboneHead(), wrt=nnx.PathContains("Dense_0"))
    with pytest.raises(ValueError, match="backbone/kernel, head/bias"):
        layer(X)
    assert not layer.built and layer.weights == []
    with pytest.raises(ValueError, match="selects none of the parameters"):
        layer(X)  # the same error again, not a half-built layer's


def test_wrt_cannot_be_changed_afterwards():
    layer = FlaxLayer(nnx_modules.LoRAMLP(nnx.Rngs(0)), wrt=nnx.LoRAParam)
    with pytest.raises(AttributeError) as error:
        layer.wrt = nnx.Param
    message = str(error.value)
    assert "fixed when the layer is made" in message
    assert "Received: layer.wrt = <class" in message
    assert "new.flax_variables = layer.flax_variables" in message
    assert layer.wrt is nnx.LoRAParam


@pytest.mark.parametrize("local", [False, True])
def test_a_filter_without_import_path_fails_at_save_naming_the_fix(
    local, tmp_path
):
    def trains_head(path, value):
        return "head" in path

    wrt = trains_head if local else (lambda path, value: "head" in path)
    layer = FlaxLayer(modules.BackboneHead(), wrt=wrt, seed=0)
    model = fitted(layer, epochs=1)
    with pytest.raises(TypeError) as error:
        model.save(tmp_path / "m.keras")
    message = str(error.value)
    assert "`wrt` cannot be saved in a model config" in message
    assert "Received: wrt=<function" in message
    assert "Fix: define the function at the top level of a module" in message
    # The model still trains, predicts and saves its weights.
    fitted(layer, epochs=1)
    model.save_weights(tmp_path / "m.weights.h5")
    again = keras.Sequential(
        [keras.Input((4,)), FlaxLayer(modules.BackboneHead(), wrt=wrt)]
    )
    again.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(
        again.predict(X, verbose=0), model.predict(X, verbose=0)
    )


# 2. Assigning `flax_variables`.


def test_linen_assignment_takes_module_init_output():
    module = modules.BatchNormDropout()
    layer = FlaxLayer(module, seed=0)
    layer(X)
    new = module.init(jax.random.key(7), X)
    new = jax.tree_util.tree_map(lambda a: a + 0.5, new)
    layer.flax_variables = new
    assert_trees_close(layer.flax_variables, new, 0, 0)
    np.testing.assert_allclose(
        layer(X), module.apply(new, X), rtol=1e-6, atol=1e-6
    )


def test_linen_assignment_takes_boxed_variables():
    class Sharded(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.ones, (None, "model"))
            return nn.Dense(3, kernel_init=init)(x)

    module = Sharded()
    layer = FlaxLayer(module, seed=0)
    layer(X)
    boxed = module.init(jax.random.key(1), X)
    assert isinstance(boxed["params"]["Dense_0"]["kernel"], nn.Partitioned)
    boxed = jax.tree_util.tree_map(lambda a: a * 2.0, boxed)
    layer.flax_variables = boxed
    np.testing.assert_array_equal(
        layer.flax_variables["params"]["Dense_0"]["kernel"],
        np.full((4, 3), 2.0),
    )


@pytest.mark.parametrize("as_dict", [False, True])
def test_nnx_assignment_takes_state_or_pure_dict_and_updates_the_module(
    as_dict,
):
    module = nnx_modules.ConvBatchNormDropout(nnx.Rngs(0))
    layer = FlaxLayer(module)
    other = nnx_modules.ConvBatchNormDropout(nnx.Rngs(5))
    x = data(2, 6, 6, 1)
    other(x)  # batch statistics and RNG counts move
    state = nnx.state(other)
    layer.flax_variables = nnx.to_pure_dict(state) if as_dict else state
    want = pure(nnx.state(other))
    assert_trees_close(pure(layer.flax_variables), want, 0, 0)
    # The user's module holds them too.
    assert_trees_close(pure(nnx.state(module)), want, 0, 0)
    other.eval()
    np.testing.assert_allclose(layer(x), other(x), rtol=1e-5, atol=1e-6)


def test_assignment_after_fit_is_what_predict_uses():
    layer = FlaxLayer(modules.BackboneHead(), seed=0)
    model = fitted(layer, epochs=1)
    new = modules.BackboneHead().init(jax.random.key(3), X)
    given = arrays(new)
    layer.flax_variables = new
    np.testing.assert_allclose(
        model.predict(X, verbose=0),
        modules.BackboneHead().apply(new, X),
        rtol=1e-6,
        atol=1e-6,
    )
    fitted(layer, epochs=1)  # and training goes on from them
    # The given arrays were copied: still the user's, unchanged, after `fit`.
    for a, b in zip(arrays(new), given, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        layer.flax_variables["params"]["head"]["bias"],
        new["params"]["head"]["bias"],
    )


def misfits(variables):
    """Ways of getting `variables` (a linen dict) wrong, with what the
    message must name."""
    params = variables["params"]
    missing = {"params": {k: v for k, v in params.items() if k != "head"}}
    extra = {"params": {**params, "extra": {"kernel": np.ones(2)}}}
    shape = {
        "params": {**params, "head": {**params["head"], "bias": np.ones(4)}}
    }
    kind = {
        "params": {
            **params,
            "head": {**params["head"], "bias": np.ones(3, "int32")},
        }
    }
    text = {"params": {**params, "head": {**params["head"], "bias": "zero"}}}
    return {
        "missing": (missing, "Missing: params/head/bias, params/head/kernel."),
        "extra": (extra, "Not held by the layer: params/extra/kernel."),
        "shape": (shape, "At params/head/bias the given array has shape (4,)"),
        "dtype": (kind, "At params/head/bias the given array has dtype int32"),
        "not an array": (text, "params/head/bias = 'zero'"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "extra", "shape", "dtype", "not an array"]
)
def test_misfit_assignment_names_the_paths_and_changes_nothing(case):
    layer = FlaxLayer(modules.BackboneHead(), seed=0)
    before = layer(X)
    held = layer.flax_variables
    bad, expected = misfits(modules.BackboneHead().init(jax.random.key(9), X))[
        case
    ]
    with pytest.raises((ValueError, TypeError)) as error:
        layer.flax_variables = bad
    message = str(error.value)
    assert expected in message
    assert "flax_variables" in message
    assert "Fix" in message or "Pass the output of" in message
    assert_trees_close(layer.flax_variables, held, 0, 0)
    np.testing.assert_array_equal(layer(X), before)


def test_nnx_misfit_assignment_changes_neither_layer_nor_module():
    module = nnx_modules.LoRAMLP(nnx.Rngs(0))
    layer = FlaxLayer(module)
    before = arrays(nnx.state(module))
    other = nnx_modules.LoRAMLP(nnx.Rngs(1))
    bad = nnx.to_pure_dict(nnx.state(other))
    del bad["linear2"]["lora"]
    bad["linear1"]["kernel"] = np.ones((4, 9), "float32")
    with pytest.raises(ValueError) as error:
        layer.flax_variables = bad
    message = str(error.value)
    assert "Missing: linear2/lora/lora_a, linear2/lora/lora_b." in message
    assert "At linear1/kernel the given array has shape (4, 9)" in message
    assert "nothing was assigned" in message
    for a, b in zip(before, arrays(nnx.state(module)), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(before, arrays(layer.flax_variables), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make, value, expected",
    [
        (
            lambda: FlaxLayer(modules.BackboneHead()),
            [1.0],
            "`flax_variables` must be a dict in the format returned by",
        ),
        (
            lambda: FlaxLayer(nnx_modules.LoRAMLP(nnx.Rngs(0))),
            [1.0],
            "takes an `nnx.State` (as `nnx.state(model)` returns)",
        ),
    ],
)
def test_assigning_what_is_not_variables_is_refused(make, value, expected):
    layer = make()
    layer(X)
    with pytest.raises(TypeError) as error:
        layer.flax_variables = value
    assert expected in str(error.value)
    assert "Received: flax_variables=[1.0]" in str(error.value)


def test_assignment_before_the_weights_exist_is_refused_with_the_fix():
    layer = FlaxLayer(modules.BackboneHead())
    with pytest.raises(ValueError) as error:
        layer.flax_variables = modules.BackboneHead().init(jax.random.key(0), X)
    assert "cannot be assigned before its weights exist" in str(error.value)
    assert "Call the layer on inputs first" in str(error.value)
    assert layer(X).shape == (32, 3)


# 3. Orbax, both ways.

# Orbax's notice when it restores without a target's shardings.
orbax_notices = pytest.mark.filterwarnings(
    "ignore:Sharding info not provided:UserWarning",
    "ignore::DeprecationWarning:orbax.*",
)


@orbax_notices
def test_plain_linen_checkpoint_restores_into_a_built_layer(tmp_path):
    module = modules.BatchNormDropout()
    variables = module.init(jax.random.key(4), X)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "flax", variables)
    checkpointer.wait_until_finished()

    layer = FlaxLayer(module, seed=0)
    layer(X)
    layer.flax_variables = checkpointer.restore(tmp_path / "flax")
    np.testing.assert_allclose(
        layer(X), module.apply(variables, X), rtol=1e-6, atol=1e-6
    )


@orbax_notices
@pytest.mark.parametrize("target", ["layer", "abstract model"])
def test_plain_nnx_checkpoint_restores_into_a_built_layer(target, tmp_path):
    model = nnx_modules.ConvBatchNormDropout(nnx.Rngs(3))
    x = data(2, 6, 6, 1)
    model(x)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "nnx", nnx.state(model))
    checkpointer.wait_until_finished()

    layer = FlaxLayer(nnx_modules.ConvBatchNormDropout(nnx.Rngs(0)))
    if target == "layer":
        abstract = layer.flax_variables
    else:
        abstract = nnx.state(
            nnx.eval_shape(
                lambda: nnx_modules.ConvBatchNormDropout(nnx.Rngs(0))
            )
        )
    layer.flax_variables = checkpointer.restore(tmp_path / "nnx", abstract)
    model.eval()
    np.testing.assert_allclose(layer(x), model(x), rtol=1e-5, atol=1e-6)


@orbax_notices
def test_layer_checkpoint_after_fit_restores_in_plain_flax(tmp_path):
    linen_layer = FlaxLayer(modules.BackboneHead(), seed=0)
    linen_model = fitted(linen_layer, epochs=1)
    nnx_layer = FlaxLayer(nnx_modules.LoRAMLP(nnx.Rngs(0)), wrt=nnx.LoRAParam)
    nnx_model = fitted(nnx_layer, epochs=1)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "linen", linen_layer.flax_variables)
    checkpointer.save(tmp_path / "nnx", nnx_layer.flax_variables)
    checkpointer.wait_until_finished()

    restored = checkpointer.restore(tmp_path / "linen")
    np.testing.assert_allclose(
        modules.BackboneHead().apply(restored, X),
        linen_model.predict(X, verbose=0),
        rtol=1e-6,
        atol=1e-6,
    )
    abstract = nnx.eval_shape(lambda: nnx_modules.LoRAMLP(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    plain = nnx.merge(graphdef, checkpointer.restore(tmp_path / "nnx", state))
    np.testing.assert_allclose(
        plain(X), nnx_model.predict(X, verbose=0), rtol=1e-6, atol=1e-6
    )


# 4. The example.


@orbax_notices
def test_finetune_lora_example_moves_only_the_adapters_and_gains_accuracy():
    path = pathlib.Path(__file__).parents[1] / "examples" / "finetune_lora.py"
    spec = importlib.util.spec_from_file_location("finetune_lora", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    numbers = example.run(
        hidden=16, rank=2, pretrain_epochs=3, finetune_epochs=3
    )
    # The checkpoint restored into the layer is the pretrained model.
    assert numbers["restored accuracy"] == numbers["pretrained accuracy"]
    assert numbers["pretrained accuracy"] > 0.8
    assert numbers["largest change, pretrained parameters"] == 0.0
    assert numbers["largest change, LoRA parameters"] > 0.01
    assert (
        numbers["fine-tuned accuracy, shifted task"]
        > numbers["restored accuracy, shifted task"] + 0.2
    )
    # Two LoRA layers of rank 2 (64 -> 16 -> 10) train; the rest does not.
    assert numbers["trainable parameters"] == (64 + 16) * 2 + (16 + 10) * 2
    assert numbers["non-trainable parameters"] == 64 * 16 + 16 + 16 * 10 + 10
