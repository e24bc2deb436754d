"""Bad input: one clear error naming the argument, what was given, the fix."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import layer_flax_module_wrapper
from keras_flax import layer_jax_model_wrapper
from tests import modules
from tests.conftest import data


class NoInputs(nn.Module):
    @nn.compact
    def __call__(self):
        return self.param("w", nn.initializers.zeros, (2,))


class Lazy(nn.Module):
    @nn.compact
    def __call__(self, x):
        if x.shape[1] < 1000:
            raise ValueError("needs more than 1000 features")
        return nn.Dense(2)(x)


def _call_with_extra(params, inputs, extra):
    return inputs


def _call_without_inputs(params, training):
    return params


CONSTRUCTION_CASES = [
    # (id, constructor, exception type, regex that must be in the message)
    (
        "function-as-module",
        lambda: FlaxLayer(modules.dense_call),
        TypeError,
        r"`module` must be .* Received: module=.*function.*keras_flax.JaxLayer",
    ),
    (
        "class-as-module",
        lambda: FlaxLayer(modules.MLP),
        TypeError,
        r"`module` must be .* Received: module=.*class.* "
        r"FlaxLayer\(MLP\(\.\.\.\)\)",
    ),
    (
        "none-as-module",
        lambda: FlaxLayer(None),
        TypeError,
        r"`module` must be .* Received: module=None",
    ),
    (
        "unknown-method-name",
        lambda: FlaxLayer(modules.MLP(), method="decode"),
        ValueError,
        r"`method` names no method .* method='decode'.* 'encode'",
    ),
    (
        "method-wrong-type",
        lambda: FlaxLayer(modules.MLP(), method=3),
        TypeError,
        r"`method` must be .* Received: method=3",
    ),
    (
        "method-without-inputs",
        lambda: FlaxLayer(NoInputs()),
        ValueError,
        r"`method` must take the inputs .* method=NoInputs.__call__",
    ),
    (
        "method-unfillable-argument",
        lambda: FlaxLayer(modules.TwoInputs(), method="forward"),
        ValueError,
        r"(?s)required argument `input2` .* method=TwoInputs.forward.*"
        r"module.forward\(inputs, input2=\.\.\., deterministic=not training\)",
    ),
    (
        "variables-not-a-dict",
        lambda: FlaxLayer(modules.MLP(), variables=[1, 2]),
        TypeError,
        r"`variables` must be a dict .* Received: variables=\[1, 2\]",
    ),
    (
        "call-fn-not-callable",
        lambda: JaxLayer("f", params={}),
        TypeError,
        r"`call_fn` must be a callable. Received: call_fn='f'",
    ),
    (
        "call-fn-unknown-argument",
        lambda: JaxLayer(_call_with_extra, params={}),
        ValueError,
        r"`call_fn` has an argument `extra` .* \(params, inputs, extra\)",
    ),
    (
        "call-fn-without-inputs",
        lambda: JaxLayer(_call_without_inputs, params={}),
        ValueError,
        r"`call_fn` must take an argument named `inputs`",
    ),
    (
        "nothing-to-initialize",
        lambda: JaxLayer(modules.dense_call),
        ValueError,
        r"`init_fn`, `params` and `state` cannot all be `None`",
    ),
    (
        "init-fn-unknown-argument",
        lambda: JaxLayer(modules.dense_call, init_fn=_call_with_extra),
        ValueError,
        r"`init_fn` has an argument `params`",
    ),
    (
        "compose-bad-object",
        lambda: layer_flax_module_wrapper("model", module=modules.MLP()),
        TypeError,
        r"`object` of layer_flax_module_wrapper\(\) must be .* "
        r"Received: object='model'",
    ),
    (
        "compose-jax-bad-object",
        lambda: layer_jax_model_wrapper(
            3, call_fn=modules.dense_call, init_fn=modules.dense_init
        ),
        TypeError,
        r"`object` of layer_jax_model_wrapper\(\) .* object=3",
    ),
]


@pytest.mark.parametrize(
    "make, error, match",
    [c[1:] for c in CONSTRUCTION_CASES],
    ids=[c[0] for c in CONSTRUCTION_CASES],
)
def test_bad_construction_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_unsupported_backend_is_refused_at_construction(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(
        ValueError, match=r"KERAS_BACKEND='torch'.*KERAS_BACKEND=jax"
    ):
        FlaxLayer(modules.MLP())


def test_variables_without_params_named_at_build():
    module = modules.BatchNormOnly()
    variables = module.init(jax.random.key(0), data(2, 5))
    layer = FlaxLayer(
        module, variables={"batch_stats": variables["batch_stats"]}
    )
    with pytest.raises(
        ValueError, match=r"no 'params' collection.*batch_stats"
    ):
        layer(keras.Input((5,)))


def test_variables_of_wrong_shape_name_the_path_and_both_shapes():
    module = modules.MLP()
    variables = module.init(jax.random.key(0), data(1, 7))
    layer = FlaxLayer(module, variables=variables)
    with pytest.raises(
        ValueError,
        match=r"`variables` does not fit the inputs of \(None, 3\) float32\. "
        r"At params/Dense_0/kernel the given array has shape \(7, 16\) but "
        r"the module creates \(3, 16\).*variables=None",
    ):
        layer(keras.Input((3,)))
    # Nothing half-built: the same layer works on the right inputs.
    x = data(2, 7)
    np.testing.assert_allclose(layer(x), module.apply(variables, x), 1e-6)


def test_variables_with_extra_and_missing_leaves_are_listed():
    module = modules.MLP()
    variables = module.init(jax.random.key(0), data(1, 4))
    params = dict(variables["params"])
    params["Extra_0"] = {"kernel": jnp.zeros((2, 2))}
    del params["Dense_1"]
    layer = FlaxLayer(module, variables={"params": params})
    with pytest.raises(
        ValueError,
        match=r"Missing: params/Dense_1/bias, params/Dense_1/kernel "
        r"Unexpected: params/Extra_0/kernel",
    ):
        layer(keras.Input((4,)))


def test_state_returned_with_another_structure():
    def call_fn(params, state, inputs):
        return inputs, {"renamed": state["count"] + 1}

    layer = JaxLayer(call_fn, params={}, state={"count": jnp.zeros(())})
    with pytest.raises(
        ValueError,
        match=r"state returned by `call_fn` does not have the structure.*"
        r"Missing: count Unexpected: renamed",
    ):
        layer(data(2, 3))


def test_stateful_call_fn_must_return_a_pair():
    def call_fn(params, state, inputs):
        return inputs

    layer = JaxLayer(call_fn, params={}, state={"count": jnp.zeros(())})
    with pytest.raises(
        ValueError, match=r"must return `\(outputs, new_state\)`"
    ):
        layer(data(2, 3))


def test_inputs_of_wrong_rank_after_build():
    layer = FlaxLayer(modules.MLP(), seed=0)
    layer(data(2, 5))
    with pytest.raises(
        ValueError,
        match=r"`inputs` do not fit layer 'flax_layer': it was built for shape "
        r"\(None, 5\) float32\. Received: inputs with shape \(2, 5, 1\)",
    ):
        layer(data(2, 5, 1))
    with pytest.raises(ValueError, match=r"built for shape \(None, 5\)"):
        layer(data(2, 6))
    np.testing.assert_equal(layer(data(3, 5)).shape, (3, 4))  # still usable


def test_inputs_of_wrong_dtype_after_build():
    layer = FlaxLayer(modules.Embedder(), seed=0)
    layer(np.zeros((2, 10), "int32"))
    with pytest.raises(
        ValueError,
        match=r"built for dtype integer or bool .* Received: "
        r"inputs with dtype floating \(float32\)",
    ):
        layer(data(2, 10))


def test_inputs_of_another_structure_after_build():
    layer = FlaxLayer(modules.MLP(), seed=0)
    layer(data(2, 5))
    with pytest.raises(ValueError, match=r"built for inputs structured as"):
        layer((data(2, 5), data(2, 5)))


def test_module_failing_on_every_placeholder_names_the_fix():
    layer = FlaxLayer(Lazy(), seed=0)
    with pytest.raises(
        ValueError,
        match=r"`init_fn` failed on placeholder inputs \(None, 3\) float32.*"
        r"needs more than 1000 features.*keras.Input\(shape=",
    ):
        layer(keras.Input((3,)))
    assert not layer.built and not layer.weights  # nothing half-built


def test_nan_inputs_propagate_and_empty_batches_work():
    module = modules.MLP()
    layer = FlaxLayer(module, seed=0)
    x = data(3, 5)
    x[1, 2] = np.nan
    out = np.asarray(layer(x))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    assert layer(np.zeros((0, 5), "float32")).shape == (0, 4)
