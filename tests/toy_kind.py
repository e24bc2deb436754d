"""A kind of model added from the tests alone, as a user would add one.

The library: "toy" modules, frozen dataclasses of their sizes whose
`init(key, in_features)` returns `(params, stats)` and whose
`apply(params, stats, x, training)` returns `(y, new stats)`. Its kind is
registered through `_kinds.register`, as the built-in kinds are, and
wrapped by `ToyLayer`; `tests/model_test.py` runs the conformance suite
on it. Nothing under `src/` knows of it.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import keras

from keras_flax import _kinds
from keras_flax._layer import ModelLayer
from keras_flax._model import Model
from keras_flax._model import Rng

# The library.


@dataclasses.dataclass(frozen=True)
class Dense:
    features: int

    def init(self, key, in_features):
        w = jax.random.normal(key, (in_features, self.features)) * 0.3
        return {"w": w, "b": jnp.zeros((self.features,))}, {}

    def apply(self, params, stats, x, training):
        return x @ params["w"] + params["b"], stats


@dataclasses.dataclass(frozen=True)
class Centered:
    """`tanh(x)` less its running mean, updated in training."""

    momentum: float = 0.9

    def init(self, key, in_features):
        return {}, {"mean": jnp.zeros((in_features,))}

    def apply(self, params, stats, x, training):
        h = jnp.tanh(x)
        if training:
            mean = self.momentum * stats["mean"] + (1 - self.momentum) * h.mean(
                0
            )
            stats = {"mean": mean}
        return h - stats["mean"], stats


@dataclasses.dataclass(frozen=True)
class Chain:
    """Named modules applied in order."""

    layers: tuple[tuple[str, Any], ...]

    def init(self, key, in_features):
        params, stats = {}, {}
        for (name, layer), k in zip(
            self.layers, jax.random.split(key, len(self.layers)), strict=True
        ):
            params[name], stats[name] = layer.init(k, in_features)
            in_features = getattr(layer, "features", in_features)
        return params, stats

    def apply(self, params, stats, x, training):
        new = {}
        for name, layer in self.layers:
            x, new[name] = layer.apply(params[name], stats[name], x, training)
        return x, new


_CLASSES = {cls.__name__: cls for cls in (Dense, Centered)}

# Its kind: the adapter, the rebuild from a config, and the layer.


def adapt(module: Chain) -> Model:
    return Model(
        init=lambda rng, x: (*module.init(rng, x.shape[-1]), {}),
        apply=lambda p, s, rng, x, training: module.apply(p, s, x, training),
        params=None,
        state=None,
        names=lambda trainable, parts: (
            parts if trainable else ("stats", *parts)
        ),
        rng=Rng(init=lambda seed: jax.random.key(seed or 0)),
        takes_training=True,
        config=lambda: {"module": {"toy": _config(module)}},
        wrapped=module,
    )


def _config(module: Chain) -> list:
    return [
        [name, type(layer).__name__, dataclasses.asdict(layer)]
        for name, layer in module.layers
    ]


def rebuild(config: dict) -> Chain | None:
    if "toy" not in config:
        return None
    return Chain(
        tuple(
            (name, _CLASSES[cls](**fields))
            for name, cls, fields in config["toy"]
        )
    )


_kinds.register(
    _kinds.Kind(
        name="toy",
        layer="ToyLayer",
        label="a toy module",
        recognises=lambda obj: isinstance(obj, Chain),
        adapt=adapt,
        rebuild=rebuild,
    )
)


@keras.saving.register_keras_serializable(package="toy_kind")
class ToyLayer(ModelLayer):
    def __init__(self, module, **kwargs):
        kind = _kinds.of(
            module, "ToyLayer", lambda obj: f"not a Chain: {obj!r}"
        )
        super().__init__(kind.adapt(module), **kwargs)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(_kinds.rebuilt(config.pop("module"), "ToyLayer"), **config)
