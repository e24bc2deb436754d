"""Bad input, everywhere: one clear error, then the fixed layer works.

Each case triggers one bad input at construction, build, call, save or
load, for linen, NNX and JaxLayer; asserts the exception type and that the
message names the argument or PyTree path and the fix; then shows that
nothing was half-built: the same layer object (or, for a refused
construction, the corrected call) works.
"""

import dataclasses
import inspect
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import layer_flax_module_wrapper
from keras_flax import layer_jax_model_wrapper
from tests import modules
from tests import nnx_modules
from tests.conftest import data
from tests.conftest import variable_values


class NoInputs(nn.Module):
    @nn.compact
    def __call__(self):
        return self.param("w", nn.initializers.zeros, (2,))


class Picky(nn.Module):
    """Fails on placeholders of fewer than 1000 features."""

    @nn.compact
    def __call__(self, x):
        if x.shape[1] < 1000:
            raise ValueError("needs more than 1000 features")
        return nn.Dense(2)(x)


def _call_with_extra(params, inputs, extra):
    return inputs


def _call_without_inputs(params, training):
    return params


def _updated_nnx_layer():
    """The fix `nnx_with_variables` gives: values into the module with
    `nnx.update`, then wrapped."""
    module = nnx_modules.MLP(nnx.Rngs(0))
    nnx.update(module, nnx.state(nnx_modules.MLP(nnx.Rngs(1))))
    return FlaxLayer(module)


def _mlp_variables(features=7):
    return modules.MLP().init(jax.random.key(0), data(1, features))


def _renaming_call(params, state, inputs):
    return inputs, {"renamed": state["count"] + 1}


def _unpaired_call(params, state, inputs):
    return inputs


def _counting_call(params, state, inputs):
    return inputs, {"count": state["count"] + 1}


def _float_counter_call(params, state, inputs):
    return inputs, {"count": state["count"] + 0.5}


@dataclasses.dataclass
class Case:
    id: str
    trigger: Callable  # (context) -> None, raises
    error: type
    match: str
    fix: Callable  # (context) -> None, works
    setup: Callable = lambda: None  # () -> context (e.g. a layer)


def _takes_training(fn):
    return "training" in inspect.signature(fn).parameters


def _plain(layer, x):
    """What the layer's model returns on `x` in inference, called as its
    framework calls it, on the layer's current values."""
    if isinstance(layer, JaxLayer) and not isinstance(layer, FlaxLayer):
        given = {
            "params": variable_values(layer.params),
            "state": variable_values(layer.state),
            "rng": None,
            "inputs": x,
            "training": False,
        }
        result = layer.call_fn(*(given[a] for a in layer.call_fn_arguments))
        return result[0] if layer.call_fn_has_state else result
    module, method = layer.module, layer.method
    if isinstance(module, nnx.Module):
        copy = nnx.merge(*nnx.split(module))
        copy.eval()
        if method is None:
            return copy(x)
        if isinstance(method, str):
            return getattr(copy, method)(x)
        return method(copy, x)
    fn = method if callable(method) else getattr(module, method or "__call__")
    kwargs = {"training": False} if _takes_training(fn) else {}
    return module.apply(layer.flax_variables, x, method=method, **kwargs)


def _works(layer, x):
    """The layer runs on `x` and returns what its model returns."""
    out = layer(x)
    expected = _plain(layer, x)
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    for got, want in zip(
        jax.tree.leaves(out), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(out), "no outputs to compare"


def _ignoring_inputs(module, inputs):
    return module()


def _mlp_layer():
    return FlaxLayer(modules.MLP(), seed=0)


def _built(layer, x):
    layer(x)
    return layer


CASES = [
    # Construction: wrong kinds of objects.
    Case(
        "function-as-module",
        lambda _: FlaxLayer(modules.dense_call),
        TypeError,
        r"`module` must be .* Received: module=.*function.*"
        r"keras_flax.JaxLayer\(call_fn=",
        lambda _: _works(
            JaxLayer(call_fn=modules.dense_call, init_fn=modules.dense_init),
            data(2, 5),
        ),
    ),
    Case(
        "linen-class-as-module",
        lambda _: FlaxLayer(modules.MLP),
        TypeError,
        r"Received: module=.*class.* instantiate it: "
        r"FlaxLayer\(MLP\(\.\.\.\)\)",
        lambda _: _works(FlaxLayer(modules.MLP()), data(2, 3)),
    ),
    Case(
        "nnx-class-as-module",
        lambda _: FlaxLayer(nnx_modules.MLP),
        TypeError,
        r"instantiate it: FlaxLayer\(MLP\(\.\.\., rngs=nnx.Rngs\(0\)\)\)",
        lambda _: _works(FlaxLayer(nnx_modules.MLP(nnx.Rngs(0))), data(2, 4)),
    ),
    Case(
        "none-as-module",
        lambda _: FlaxLayer(None),
        TypeError,
        r"`module` must be .* Received: module=None",
        lambda _: _works(FlaxLayer(modules.MLP()), data(2, 3)),
    ),
    Case(
        "array-as-module",
        lambda _: FlaxLayer(np.zeros(3)),
        TypeError,
        r"Received: module=array.* Pass a Module instance",
        lambda _: _works(FlaxLayer(modules.MLP()), data(2, 3)),
    ),
    # Construction: methods.
    Case(
        "unknown-method-name",
        lambda _: FlaxLayer(modules.MLP(), method="decode"),
        ValueError,
        r"`method` names no method of MLP.* method='decode'.* 'encode'",
        lambda _: _works(FlaxLayer(modules.MLP(), method="encode"), data(2, 3)),
    ),
    Case(
        "nnx-unknown-method-name",
        lambda _: FlaxLayer(nnx_modules.MLP(nnx.Rngs(0)), method="encode"),
        ValueError,
        r"names no method of MLP.*'hidden'",
        lambda _: _works(
            FlaxLayer(nnx_modules.MLP(nnx.Rngs(0)), method="hidden"),
            data(2, 4),
        ),
    ),
    Case(
        "method-of-wrong-type",
        lambda _: FlaxLayer(modules.MLP(), method=3),
        TypeError,
        r"`method` must be .* Received: method=3",
        lambda _: _works(FlaxLayer(modules.MLP(), method=None), data(2, 3)),
    ),
    Case(
        "method-without-inputs",
        lambda _: FlaxLayer(NoInputs()),
        ValueError,
        r"`method` must take the inputs .* method=NoInputs.__call__.*wrap it",
        lambda _: _works(
            FlaxLayer(NoInputs(), method=_ignoring_inputs), data(2, 3)
        ),
    ),
    Case(
        "nnx-method-without-inputs",
        lambda _: FlaxLayer(nnx_modules.MLP(nnx.Rngs(0)), method=lambda m: m),
        ValueError,
        r"`method` must take the inputs",
        lambda _: _works(
            FlaxLayer(
                nnx_modules.MLP(nnx.Rngs(0)), method=lambda m, x: m.hidden(x)
            ),
            data(2, 4),
        ),
    ),
    Case(
        "method-with-unknown-required-argument",
        lambda _: FlaxLayer(modules.TwoInputs(), method="forward"),
        ValueError,
        r"(?s)required argument `input2` .* method=TwoInputs.forward.*"
        r"module.forward\(inputs, input2=\.\.\., deterministic=not training\)",
        lambda _: _works(
            FlaxLayer(modules.TwoInputs(), method=modules.two_inputs_wrapper),
            (data(2, 3), data(2, 2)),
        ),
    ),
    # Construction: variables.
    Case(
        "variables-not-a-dict",
        lambda _: FlaxLayer(modules.MLP(), variables=[1, 2]),
        TypeError,
        r"`variables` must be a dict .* Received: variables=\[1, 2\].*"
        r"module.init\(rng, x\)",
        lambda _: _works(
            FlaxLayer(modules.MLP(), variables=_mlp_variables()), data(2, 7)
        ),
    ),
    Case(
        "variables-with-non-array-leaves",
        lambda _: FlaxLayer(
            modules.MLP(),
            variables={"params": {"Dense_0": {"kernel": "weights.npy"}}},
        ),
        TypeError,
        r"non-array leaves at params/Dense_0/kernel = 'weights.npy'",
        lambda _: _works(
            FlaxLayer(modules.MLP(), variables=_mlp_variables()), data(2, 7)
        ),
    ),
    Case(
        "nnx-with-variables",
        lambda _: FlaxLayer(
            nnx_modules.MLP(nnx.Rngs(0)), variables={"params": {}}
        ),
        ValueError,
        r"`variables` is for linen modules.*nnx.update\(module, state\)",
        lambda _: _works(_updated_nnx_layer(), data(2, 4)),
    ),
    Case(
        "nnx-with-rng-collections",
        lambda _: FlaxLayer(
            nnx_modules.MLP(nnx.Rngs(0)), rng_collections=("dropout",)
        ),
        ValueError,
        r"`rng_collections` is for linen modules.*nnx.Rngs\(0, noise=1\)",
        lambda _: _works(FlaxLayer(nnx_modules.MLP(nnx.Rngs(0))), data(2, 4)),
    ),
    # Construction: JaxLayer functions, composition helpers.
    Case(
        "call-fn-not-callable",
        lambda _: JaxLayer("f", params={}),
        TypeError,
        r"`call_fn` must be a callable. Received: call_fn='f'",
        lambda _: _works(
            JaxLayer(modules.dense_call, modules.dense_init), data(2, 5)
        ),
    ),
    Case(
        "call-fn-unknown-argument",
        lambda _: JaxLayer(_call_with_extra, params={}),
        ValueError,
        r"`call_fn` has an argument `extra` .* \(params, inputs, extra\).*"
        r"lambda params, inputs: call_fn\(params, inputs, extra=\.\.\.\)",
        lambda _: _works(
            JaxLayer(
                lambda params, inputs: _call_with_extra(params, inputs, 1),
                params={"w": data(3)},
            ),
            data(2, 5),
        ),
    ),
    Case(
        "call-fn-without-inputs",
        lambda _: JaxLayer(_call_without_inputs, params={}),
        ValueError,
        r"`call_fn` must take an argument named `inputs`.*wrap the function",
        lambda _: _works(
            JaxLayer(
                lambda params, inputs, training: _call_without_inputs(
                    params, training
                ),
                params={"w": data(3)},
            ),
            data(2, 5),
        ),
    ),
    Case(
        "nothing-to-initialize",
        lambda _: JaxLayer(modules.dense_call),
        ValueError,
        r"`init_fn`, `params` and `state` cannot all be `None`.*"
        r"Pass `init_fn`",
        lambda _: _works(
            JaxLayer(modules.dense_call, modules.dense_init), data(2, 5)
        ),
    ),
    Case(
        "init-fn-unknown-argument",
        lambda _: JaxLayer(modules.dense_call, init_fn=_call_with_extra),
        ValueError,
        r"`init_fn` has an argument `params`",
        lambda _: _works(
            JaxLayer(modules.dense_call, modules.dense_init), data(2, 5)
        ),
    ),
    Case(
        "compose-bad-object",
        lambda _: layer_flax_module_wrapper("model", module=modules.MLP()),
        TypeError,
        r"`object` of layer_flax_module_wrapper\(\) must be .* "
        r"Received: object='model'.*`layer = layer_flax_module_wrapper",
        lambda _: layer_flax_module_wrapper(data(2, 3), module=modules.MLP()),
    ),
    Case(
        "compose-jax-bad-object",
        lambda _: layer_jax_model_wrapper(
            3, call_fn=modules.dense_call, init_fn=modules.dense_init
        ),
        TypeError,
        r"`object` of layer_jax_model_wrapper\(\) .* object=3",
        lambda _: layer_jax_model_wrapper(
            data(2, 5), call_fn=modules.dense_call, init_fn=modules.dense_init
        ),
    ),
    # Build.
    Case(
        "variables-without-params",
        lambda layer: layer(keras.Input((5,))),
        ValueError,
        r"no 'params' collection.*batch_stats.*\{'params': params, \*\*state\}",
        lambda _: _works(
            FlaxLayer(
                modules.BatchNormOnly(),
                variables=modules.BatchNormOnly().init(
                    jax.random.key(0), data(1, 5)
                ),
            ),
            data(2, 5),
        ),
        setup=lambda: FlaxLayer(
            modules.BatchNormOnly(),
            variables={
                "batch_stats": modules.BatchNormOnly().init(
                    jax.random.key(0), data(1, 5)
                )["batch_stats"]
            },
        ),
    ),
    Case(
        "variables-of-wrong-shape",
        lambda layer: layer(keras.Input((3,))),
        ValueError,
        r"`variables` does not fit the inputs of \(None, 3\) float32\. "
        r"At params/Dense_0/kernel the given array has shape \(7, 16\) but "
        r"the module creates \(3, 16\).*variables=None",
        lambda layer: _works(layer, data(2, 7)),
        setup=lambda: FlaxLayer(modules.MLP(), variables=_mlp_variables()),
    ),
    Case(
        # Extra leaves are accepted (kept, frozen) as Flax accepts them;
        # missing ones are refused.
        "variables-with-extra-and-missing-leaves",
        lambda layer: layer(keras.Input((7,))),
        ValueError,
        r"Missing: params/Dense_1/bias, params/Dense_1/kernel "
        r"Call the layer on inputs",
        # The missing leaves given; the extra one is kept, frozen.
        lambda layer: _works(
            FlaxLayer(
                modules.MLP(),
                variables={
                    "params": {
                        **_mlp_variables()["params"],
                        "Extra_0": {"kernel": jnp.zeros((2, 2))},
                    }
                },
            ),
            data(2, 7),
        ),
        setup=lambda: FlaxLayer(
            modules.MLP(),
            variables={
                "params": {
                    "Dense_0": _mlp_variables()["params"]["Dense_0"],
                    "Extra_0": {"kernel": jnp.zeros((2, 2))},
                }
            },
        ),
    ),
    Case(
        "variables-of-wrong-dtype",
        lambda layer: layer(keras.Input((7,))),
        ValueError,
        r"At params/Dense_0/kernel the given array has dtype int32 but the "
        r"module creates float32",
        lambda layer: _works(
            FlaxLayer(modules.MLP(), variables=_mlp_variables()), data(2, 7)
        ),
        setup=lambda: FlaxLayer(
            modules.MLP(),
            variables=jax.tree_util.tree_map_with_path(
                lambda p, v: v.astype("int32") if "Dense_0" in str(p) else v,
                _mlp_variables(),
            ),
        ),
    ),
    Case(
        "module-failing-on-every-placeholder",
        lambda layer: layer(keras.Input((3,))),
        ValueError,
        r"`module` failed on placeholder inputs \(None, 3\) float32.*"
        r"needs more than 1000 features.*keras.Input\(shape=",
        lambda layer: _works(layer, data(2, 1000)),
        setup=lambda: FlaxLayer(Picky(), seed=0),
    ),
    Case(
        # Variables for 6x6 images (9 patches): no size tried fits.
        "unknown-sizes-the-module-cannot-take",
        lambda layer: layer(keras.Input((None, None, 3))),
        ValueError,
        r"Layer 'patches' cannot compute its output shape: the module takes "
        r"neither symbolic sizes nor any of the sizes tried .* \(dimension "
        r"1, dimension 2\)\. The module raised: .*keras.Input\(shape=",
        lambda layer: (
            layer(keras.Input((6, 6, 3))),
            _works(layer, data(2, 6, 6, 3)),
        ),
        setup=lambda: FlaxLayer(
            modules.PatchEmbeddings(),
            variables=modules.PatchEmbeddings().init(
                jax.random.key(0), data(1, 6, 6, 3)
            ),
            name="patches",
        ),
    ),
    # Call.
    Case(
        "state-returned-with-another-structure",
        lambda layer: layer(data(2, 3)),
        ValueError,
        r"state returned by `call_fn` does not have the structure.*"
        r"Missing: count Unexpected: renamed.*same keys and shapes",
        lambda layer: _works(
            JaxLayer(_counting_call, params={}, state={"count": jnp.zeros(())}),
            data(2, 3),
        ),
        setup=lambda: JaxLayer(
            _renaming_call, params={}, state={"count": jnp.zeros(())}
        ),
    ),
    Case(
        "new-state-on-a-layer-holding-none",
        lambda layer: layer(data(2, 3)),
        ValueError,
        r"`call_fn` returned a new state, but the layer holds no state.*"
        r"leaves count\. Give the layer its initial state",
        lambda layer: _works(
            JaxLayer(
                modules.call_returning_new_state,
                params={"w": data(3, 2)},
                state={"count": jnp.zeros(())},
            ),
            data(2, 3),
        ),
        setup=lambda: JaxLayer(
            modules.call_returning_new_state, params={"w": data(3, 2)}
        ),
    ),
    Case(
        "state-returned-with-another-dtype",
        lambda layer: layer(data(2, 3)),
        ValueError,
        r"At count the returned array has dtype float32 where the state "
        r"holds int32",
        lambda _: _works(
            JaxLayer(
                _counting_call,
                params={},
                state={"count": jnp.zeros((), "int32")},
            ),
            data(2, 3),
        ),
        setup=lambda: JaxLayer(
            _float_counter_call,
            params={},
            state={"count": jnp.zeros((), "int32")},
        ),
    ),
    Case(
        "stateful-call-fn-not-returning-a-pair",
        lambda layer: layer(data(2, 3)),
        ValueError,
        r"must return `\(outputs, new_state\)`.*return outputs, new_state",
        lambda layer: _works(
            JaxLayer(_counting_call, params={}, state={"count": jnp.zeros(())}),
            data(2, 3),
        ),
        setup=lambda: JaxLayer(
            _unpaired_call, params={}, state={"count": jnp.zeros(())}
        ),
    ),
    Case(
        "inputs-of-wrong-rank-after-build",
        lambda layer: layer(data(2, 5, 1)),
        ValueError,
        r"`inputs` do not fit layer 'flax_layer.*': it was built for shape "
        r"\(None, 5\) float32\. Received: inputs with shape \(2, 5, 1\)",
        lambda layer: _works(layer, data(3, 5)),
        setup=lambda: _built(_mlp_layer(), data(2, 5)),
    ),
    Case(
        "layer-reused-on-incompatible-inputs",
        lambda layer: layer(keras.Input((6,))),
        ValueError,
        r"built for shape \(None, 5\) float32\. Received: inputs with shape "
        r"\(None, 6\).*create a new layer",
        lambda layer: _works(layer, data(3, 5)),
        setup=lambda: _built(_mlp_layer(), data(2, 5)),
    ),
    Case(
        "inputs-of-wrong-dtype-after-build",
        lambda layer: layer(data(2, 10)),
        ValueError,
        r"built for dtype integer or bool .* Received: inputs with dtype "
        r"floating \(float32\)",
        lambda layer: _works(layer, np.zeros((2, 10), "int32")),
        setup=lambda: _built(
            FlaxLayer(modules.Embedder(), seed=0), np.zeros((2, 10), "int32")
        ),
    ),
    Case(
        "inputs-of-another-structure-after-build",
        lambda layer: layer((data(2, 5), data(2, 5))),
        ValueError,
        r"built for inputs structured as .*Pass the same structure",
        lambda layer: _works(layer, data(2, 5)),
        setup=lambda: _built(_mlp_layer(), data(2, 5)),
    ),
    # Save.
    Case(
        "unsaveable-module-field",
        lambda layer: layer.get_config(),
        TypeError,
        r"`module.act` cannot be saved: .*<lambda>.*Make the value importable",
        lambda layer: _works(layer, data(2, 5)),
        setup=lambda: FlaxLayer(modules.Configured(act=lambda x: x), seed=0),
    ),
    Case(
        "nnx-without-config-or-recorded-call",
        lambda layer: layer.get_config(),
        TypeError,
        r"FlaxLayer.from_nnx\(MLP, \.\.\., rngs=nnx.Rngs\(0\)\).*save_weights",
        lambda layer: _works(layer, data(2, 4)),
        setup=lambda: FlaxLayer(nnx_modules.MLP(nnx.Rngs(0))),
    ),
    # Load.
    Case(
        "load-names-a-function-of-the-standard-library",
        lambda config: FlaxLayer.from_config(config),
        ValueError,
        r"refused to resolve os:system: the module os is in the standard "
        r"library.*safe_mode=False",
        lambda _: _works(
            FlaxLayer.from_config(FlaxLayer(modules.MLP()).get_config()),
            data(2, 3),
        ),
        setup=lambda: {
            **FlaxLayer(modules.MLP()).get_config(),
            "method": {"__keras_flax__": "object", "path": "os:system"},
        },
    ),
    Case(
        "load-names-a-module-that-is-not-a-module",
        lambda config: FlaxLayer.from_config(config),
        ValueError,
        r"names numpy:ones as its module class, which is not a "
        r"flax.linen.Module class",
        lambda _: _works(
            FlaxLayer.from_config(FlaxLayer(modules.MLP()).get_config()),
            data(2, 3),
        ),
        setup=lambda: {
            **FlaxLayer(modules.MLP()).get_config(),
            "module": {
                "__keras_flax__": "module",
                "class": "numpy:ones",
                "config": {},
            },
        },
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case):
    context = case.setup()
    with pytest.raises(case.error, match=case.match):
        case.trigger(context)
    case.fix(context)


def test_unsupported_backend_is_refused_at_construction(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(
        ValueError, match=r"KERAS_BACKEND='numpy'.*KERAS_BACKEND=jax"
    ):
        FlaxLayer(modules.MLP())


def test_nan_inputs_propagate_and_empty_batches_work():
    layer = FlaxLayer(modules.MLP(), seed=0)
    x = data(3, 5)
    x[1, 2] = np.nan
    out = np.asarray(layer(x))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    assert layer(np.zeros((0, 5), "float32")).shape == (0, 4)


def test_fit_with_labels_of_the_wrong_shape_then_fixed():
    layer = FlaxLayer(modules.MLP(), seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile("sgd", "mse")
    # The loss (Keras') refuses them, naming both shapes.
    with pytest.raises((TypeError, ValueError), match=r"\(8, 3\).*\(8, 4\)"):
        model.fit(data(8, 5), data(8, 3), verbose=0)
    model.fit(data(8, 5), data(8, 4), verbose=0)
