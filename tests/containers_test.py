"""Containers pass through unchanged (SPEC 8): module fields and
constructor arguments that are NamedTuples, dataclasses, `FrozenDict`s,
enums or tuples of them keep their type through every walk of the library,
and are saved and loaded as that type."""

import dataclasses
import enum
import typing

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import keras
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from keras_flax import FlaxLayer
from keras_flax import _serialization
from keras_flax import _sizes
from tests.conftest import data


class Config(typing.NamedTuple):
    width: int
    depth: int = 1


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    width: int
    scale: float = 1.0


class Mode(enum.Enum):
    FAST = 1
    SLOW = 2


def _containers():
    leaves = st.one_of(
        st.integers(1, 8), st.floats(0.5, 2.0), st.text(max_size=3)
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(Config, st.integers(1, 8), st.integers(1, 3)),
            st.builds(FrozenConfig, st.integers(1, 8), st.floats(0.5, 2.0)),
            st.sampled_from(list(Mode)),
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(
                st.text("abc", min_size=1, max_size=2), inner, max_size=3
            ),
            st.dictionaries(
                st.text("abc", min_size=1, max_size=2), inner, max_size=3
            ).map(FrozenDict),
            st.tuples(inner, inner).map(lambda t: Config(*t)),
        ),
        max_leaves=8,
    )


def _same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, (dict, FrozenDict)):
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    else:
        assert a == b


@hypothesis.given(_containers())
def test_the_placeholder_walk_keeps_every_container(value):
    assert _sizes._walk(value, lambda placeholder: 3) is value
    assert _sizes.find((value,), {"x": value}) == []


@hypothesis.given(st.builds(Config, st.integers(1, 8), st.integers(1, 3)))
def test_a_placeholder_inside_a_namedtuple_is_filled_as_that_type(config):
    holder = Config(_sizes.InputDim(), config.depth)
    filled = _sizes._walk([holder, {"c": holder}], lambda p: config.width)
    _same(filled, [config, {"c": config}])


@hypothesis.given(
    st.one_of(
        st.builds(Config, st.integers(1, 8), st.integers(1, 3)),
        st.builds(FrozenConfig, st.integers(1, 8), st.floats(0.5, 2.0)),
        st.lists(st.builds(Config, st.integers(1, 8)), max_size=3).map(tuple),
    )
)
def test_a_namedtuple_or_dataclass_saves_as_its_type(value):
    config = _serialization.serialize_value(value, "cfg")
    _same(_serialization.deserialize_value(config, "cfg"), value)


class Sized(nn.Module):
    """A linen module configured by a NamedTuple and a dataclass."""

    config: Config
    frozen: FrozenConfig = FrozenConfig(2)

    @nn.compact
    def __call__(self, x):
        for _ in range(self.config.depth):
            x = nn.Dense(self.config.width)(x)
        return x * self.frozen.scale


def test_a_linen_module_with_a_namedtuple_field_wraps_saves_and_loads(tmp_path):
    module = Sized(Config(4, 2), FrozenConfig(3, 0.5))
    layer = FlaxLayer(module, seed=0)
    x = data(2, 5)
    variables = module.init(jax.random.PRNGKey(0), x)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, layer(inputs))
    layer.flax_variables = variables
    np.testing.assert_allclose(
        model.predict(x, verbose=0), module.apply(variables, x), rtol=1e-6
    )
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[1].module == module
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


class Configured(nnx.Module):
    def __init__(self, config: Config, rngs: nnx.Rngs):
        self.linear = nnx.Linear(5, config.width, rngs=rngs)
        self.depth = config.depth

    def __call__(self, x):
        return self.linear(x) * self.depth


def test_an_nnx_constructor_argument_namedtuple_saves_and_loads(tmp_path):
    layer = FlaxLayer.from_nnx(Configured, Config(3, 2), rngs=nnx.Rngs(0))
    inputs = keras.Input((5,))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = data(2, 5)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
