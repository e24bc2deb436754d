"""Modules built the Keras way: on their first call at build, or sized from
the input (`FlaxLayer.input_dim()`), against the same module built eagerly
with explicit sizes."""

import flax.linen as nn
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from tests import nnx_modules as m
from tests.conftest import data


def _lazy_bridge():
    return nnx.bridge.ToNNX(nn.Dense(4), rngs=nnx.Rngs(0))


LAZY = {
    # Flax's way of bringing linen into NNX, without `lazy_init`.
    "linen-bridge": _lazy_bridge,
    # An NNX module creating its parameter on its first call.
    "param-on-first-call": lambda: m.LazyLinear(4, nnx.Rngs(0)),
}


def _built_eagerly(make, x):
    """The same module built by its first call in plain NNX."""
    return nnx.bridge.lazy_init(make(), x)


def _sgd_step(module, x, y, lr):
    """One plain NNX + Optax SGD step on mean squared error."""
    optimizer = nnx.Optimizer(module, optax.sgd(lr), wrt=nnx.Param)

    def loss(module):
        return jnp.mean((module(x) - y) ** 2)

    optimizer.update(module, nnx.grad(loss)(module))
    return module


@pytest.mark.parametrize("case", LAZY)
def test_lazy_module_is_built_at_build_as_its_first_call_builds_it(case):
    module = LAZY[case]()
    layer = FlaxLayer(module, name="lazy")
    model = keras.Sequential([keras.Input((3,)), layer])
    x, y = data(8, 3), data(8, 4, seed=1)
    reference = _built_eagerly(LAZY[case], x[:1])

    # The values of the module built eagerly, under its Flax names.
    expected = nnx.to_flat_state(nnx.state(reference, nnx.Param))
    assert sorted(w.path for w in layer.trainable_weights) == sorted(
        "sequential/lazy/" + "/".join(map(str, path)) for path, _ in expected
    )
    np.testing.assert_allclose(model(x), reference(x), rtol=1e-6)
    # `layer.module` is the user's module, built.
    assert layer.module is module
    np.testing.assert_allclose(module(x), reference(x), rtol=1e-6)

    # Training: one Keras SGD step is one NNX + Optax step.
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    _sgd_step(reference, x, y, 0.1)
    np.testing.assert_allclose(model(x), reference(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module(x), reference(x), rtol=1e-5, atol=1e-6)


def test_lazy_module_is_initialised_with_the_layer_seed():
    def built_kernel(seed):
        layer = FlaxLayer(_lazy_bridge(), seed=seed)
        layer.build((None, 3))
        return np.asarray(layer.module.kernel.get_value())

    unseeded = _built_eagerly(_lazy_bridge, data(1, 3))
    np.testing.assert_array_equal(built_kernel(3), built_kernel(3))
    assert not np.allclose(built_kernel(3), built_kernel(4))
    assert not np.allclose(built_kernel(3), unseeded.kernel.get_value())


def test_lazy_module_saved_through_from_nnx_loads(tmp_path):
    layer = FlaxLayer.from_nnx(
        nnx.bridge.ToNNX, nn.Dense(4), rngs=nnx.Rngs(0), layer_kwargs={}
    )
    model = keras.Sequential([keras.Input((3,)), layer])
    x = data(2, 3)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
    assert isinstance(loaded.layers[0].module, nnx.bridge.ToNNX)


def test_lazy_module_with_wrt_trains_what_it_chooses():
    layer = FlaxLayer(_lazy_bridge(), wrt=nnx.PathContains("kernel"))
    layer.build((None, 3))
    assert [w.path for w in layer.trainable_weights] == ["flax_layer/kernel"]
    assert "flax_layer/bias" in [w.path for w in layer.non_trainable_weights]


def test_first_call_failing_at_build_names_the_input_and_leaves_it_unbuilt():
    module = nnx.bridge.ToNNX(nn.Conv(4, (3, 3)), rngs=nnx.Rngs(0))
    layer = FlaxLayer(module)
    held = [w.path for w in layer.weights]
    with pytest.raises(
        ValueError,
        match=r"creates its variables when first called.*"
        r"Received: inputs \(None, 3\) float32.*"
        r"keras.Input\(shape=.*nnx.bridge.lazy_init",
    ):
        layer(keras.Input((3,)))
    assert not layer.built
    assert [w.path for w in layer.weights] == held
    assert not nnx.state(module, nnx.Param)  # the module left unbuilt
    outputs = layer(data(2, 5, 5, 3))
    assert outputs.shape == (2, 5, 5, 4)


# Sizes from the input.


@pytest.mark.parametrize("features", [20, 30])
def test_input_dim_builds_for_the_input_as_explicit_sizes_would(features):
    layer = FlaxLayer.from_nnx(
        nnx.Linear,
        FlaxLayer.input_dim(),
        10,
        rngs=nnx.Rngs(0),
        layer_kwargs={"name": "dense"},
    )
    assert layer.module is None and layer.weights == []
    model = keras.Sequential([keras.Input((features,)), layer])
    reference = nnx.Linear(features, 10, rngs=nnx.Rngs(0))
    x = data(4, features)
    np.testing.assert_allclose(model(x), reference(x), rtol=1e-6)
    assert sorted(w.path for w in layer.weights) == [
        "sequential/dense/bias",
        "sequential/dense/kernel",
    ]
    assert layer.module.kernel.shape == (features, 10)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    y = data(4, 10, seed=1)
    model.fit(x, y, batch_size=4, verbose=0)
    _sgd_step(reference, x, y, 0.1)
    np.testing.assert_allclose(model(x), reference(x), rtol=1e-5, atol=1e-6)


class _ChannelsFirstMLP(nnx.Module):
    def __init__(self, sizes, *, rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, x):
        x = jnp.moveaxis(x, 1, -1)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return x


def test_input_dim_inside_a_list_and_of_another_axis():
    layer = FlaxLayer.from_nnx(
        _ChannelsFirstMLP, [FlaxLayer.input_dim(1), 8, 2], rngs=nnx.Rngs(0)
    )
    x = data(3, 6, 5)  # channels (6) first
    outputs = layer(x)
    reference = _ChannelsFirstMLP([6, 8, 2], rngs=nnx.Rngs(0))
    np.testing.assert_allclose(outputs, reference(x), rtol=1e-6)
    assert layer.module.layers[0].kernel.shape == (6, 8)


def test_input_dim_is_recorded_in_the_config_and_load_model_rebuilds(
    tmp_path,
):
    layer = FlaxLayer.from_nnx(
        nnx.Linear, FlaxLayer.input_dim(), 10, rngs=nnx.Rngs(0)
    )
    config = layer.get_config()
    assert config["module"]["args"]["items"][0] == {
        "__keras_flax__": "input_dim",
        "axis": -1,
    }
    # The config builds for any input size.
    for features in (20, 30):
        rebuilt = FlaxLayer.from_config(config)
        rebuilt.build((None, features))
        assert rebuilt.module.kernel.shape == (features, 10)
    model = keras.Sequential([keras.Input((20,)), layer])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = data(2, 20)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
    assert loaded.layers[0].module.kernel.shape == (20, 10)


@pytest.mark.parametrize("axis", [0, 1.5, "last", True])
def test_input_dim_refuses_an_axis_no_input_fills_at_construction(axis):
    with pytest.raises(ValueError, match=rf"Received: axis={axis!r}\."):
        FlaxLayer.input_dim(axis)


def test_input_dim_refused_where_nothing_fills_it():
    with pytest.raises(
        ValueError, match=r"field `features`, which only `FlaxLayer.from_nnx`"
    ):
        FlaxLayer(nn.Dense(FlaxLayer.input_dim()))
    with pytest.raises(ValueError, match=r"in layer_kwargs \['name'\]"):
        FlaxLayer.from_nnx(
            nnx.Linear,
            3,
            10,
            rngs=nnx.Rngs(0),
            layer_kwargs={"name": FlaxLayer.input_dim()},
        )
    # A config naming the batch axis is refused as the layer is made.
    config = FlaxLayer.from_nnx(
        nnx.Linear, FlaxLayer.input_dim(), 10, rngs=nnx.Rngs(0)
    ).get_config()
    config["module"]["args"]["items"][0]["axis"] = 0
    with pytest.raises(ValueError, match=r"Received: axis=0\."):
        FlaxLayer.from_config(config)


@pytest.mark.parametrize(
    "shape, axis, message",
    [
        (
            (None,),
            -1,
            r"whose size is unknown\. Received: inputs \(None, None\)",
        ),
        ((3,), 2, r"no such non-batch axis\. Received: inputs \(None, 3\)"),
        ((3,), -2, r"no such non-batch axis\. Received: inputs \(None, 3\)"),
    ],
)
def test_input_dim_refused_at_build_names_the_input(shape, axis, message):
    layer = FlaxLayer.from_nnx(
        nnx.Linear, FlaxLayer.input_dim(axis), 10, rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match=message):
        layer(keras.Input(shape))
    assert not layer.built and layer.weights == [] and layer.module is None


def test_input_dim_refused_for_several_inputs():
    layer = FlaxLayer.from_nnx(
        nnx.Linear, FlaxLayer.input_dim(), 10, rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match=r"must be one array\. Received:"):
        layer({"a": keras.Input((3,)), "b": keras.Input((3,))})
    assert not layer.built


@pytest.mark.parametrize("features", [20, 30])
def test_readme_example_builds_for_either_input_size(features):
    bridged = FlaxLayer(nnx.bridge.ToNNX(nn.Dense(64), rngs=nnx.Rngs(0)))
    dense = FlaxLayer.from_nnx(
        nnx.Linear, FlaxLayer.input_dim(), 10, rngs=nnx.Rngs(0)
    )
    model = keras.Sequential([keras.Input((features,)), bridged, dense])
    x = data(2, features)
    reference_bridge = _built_eagerly(
        lambda: nnx.bridge.ToNNX(nn.Dense(64), rngs=nnx.Rngs(0)), x[:1]
    )
    reference_dense = nnx.Linear(64, 10, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        model(x), reference_dense(reference_bridge(x)), rtol=1e-5, atol=1e-6
    )
    assert bridged.module.kernel.shape == (features, 64)
    lines = []
    model.summary(
        expand_nested=True, print_fn=lambda line, **_: lines.append(line)
    )
    assert "kernel (Param)" in "\n".join(lines)


def test_input_dim_layer_unbuilt_has_empty_flax_variables():
    layer = FlaxLayer.from_nnx(
        nnx.Linear, FlaxLayer.input_dim(), 4, rngs=nnx.Rngs(0)
    )
    assert nnx.to_pure_dict(layer.flax_variables) == {}
    with pytest.raises(ValueError, match=r"before its weights exist"):
        layer.flax_variables = {}
    layer.build((None, 3))
    state = layer.flax_variables
    reference = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(state["kernel"].get_value(), reference.kernel)
