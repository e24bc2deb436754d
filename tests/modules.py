"""Flax modules and JAX functions shared by the tests."""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from keras_flax.demo import CNN  # noqa: F401  (the docs' CNN)


class TwoInputs(nn.Module):
    """The docs' second example: several inputs and `deterministic`."""

    @nn.compact
    def forward(self, input1, input2, deterministic):
        x = nn.Dense(8)(jnp.concatenate([input1, input2], axis=-1))
        x = nn.Dropout(0.5, deterministic=deterministic)(x)
        return nn.Dense(3)(x)


def two_inputs_wrapper(module, inputs, training):
    input1, input2 = inputs
    return module.forward(input1, input2, not training)


class MLP(nn.Module):
    features: tuple = (16, 4)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x

    def encode(self, x):
        return self(x)[..., :2]


class BatchNormDropout(nn.Module):
    """BatchNorm state and a Dropout RNG, switched by `training`."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x, training=False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.rate, deterministic=not training)(x)
        return nn.Dense(2)(x)


class BatchNormOnly(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.8)(x)
        return nn.Dense(1)(x)


class Noisy(nn.Module):
    """Draws from its own "noise" stream, in training and in inference."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        return x + jax.random.normal(self.make_rng("noise"), x.shape)


class DropoutOnly(nn.Module):
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, training=False):
        x = nn.Dense(32, use_bias=False)(x)
        return nn.Dropout(self.rate, deterministic=not training)(x)


class Embedder(nn.Module):
    """Integer token ids in."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(num_embeddings=50, features=8)(ids)
        return nn.Dense(2)(x.mean(axis=1))


class NeedsSize(nn.Module):
    """A module needing a minimum spatial size (VALID 5x5 convolutions)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (5, 5), padding="VALID")(x)
        x = nn.Conv(4, (5, 5), padding="VALID")(x)
        return x.mean(axis=(1, 2))


class Sower(nn.Module):
    """Sows intermediates into Flax's and into its own collection."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        self.sow("intermediates", "hidden", h)
        self.sow("activations", "hidden", h)
        return nn.Dense(1)(h)


class TreeInputs(nn.Module):
    """A dict of a tuple and an array in; a tuple out."""

    @nn.compact
    def __call__(self, inputs):
        a, b = inputs["pair"]
        c = inputs["single"]
        x = jnp.concatenate([a, b.reshape(b.shape[0], -1), c], axis=-1)
        return nn.Dense(3)(x), nn.Dense(1)(x)


class Rank3(nn.Module):
    """Sequence inputs (batch, time, features)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(x).sum(axis=1)


class Counter(nn.Module):
    """A user collection mutated at every call, in inference too."""

    @nn.compact
    def __call__(self, x):
        count = self.variable(
            "counter", "count", lambda: jnp.zeros((), "int32")
        )
        count.value += 1
        return nn.Dense(2)(x)


class TrainFlag(nn.Module):
    """A `train` flag instead of `training`."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))


def dense_init(rng, inputs):
    k1, _ = jax.random.split(rng)
    return {
        "dense": {
            "w": jax.random.normal(k1, (inputs.shape[-1], 3)) * 0.1,
            "b": jnp.zeros((3,)),
        }
    }


def dense_call(params, inputs):
    return inputs @ params["dense"]["w"] + params["dense"]["b"]


def stateful_init(rng, inputs):
    params = dense_init(rng, inputs)
    state = {"mean": jnp.zeros((3,)), "steps": jnp.zeros((), "int32")}
    return params, state


def stateful_call(params, state, rng, inputs, training):
    """A dense layer with a running mean of its outputs and dropout."""
    y = dense_call(params, inputs)
    if training:
        keep = jax.random.bernoulli(rng, 0.5, y.shape)
        y = jnp.where(keep, y / 0.5, 0.0)
        state = {
            "mean": 0.9 * state["mean"] + 0.1 * y.mean(axis=0),
            "steps": state["steps"] + 1,
        }
    return y, state


class Configured(nn.Module):
    """Constructor fields of the kinds a saved config must carry."""

    features: int = 4
    act: Callable = nn.relu
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    norm: Callable = functools.partial(nn.BatchNorm, momentum=0.9)
    head: nn.Module = None
    sizes: tuple = (3, 2)

    @nn.compact
    def __call__(self, x, training=False):
        x = nn.Dense(
            self.features, dtype=self.dtype, kernel_init=self.kernel_init
        )(x)
        x = self.norm(use_running_average=not training)(x)
        x = self.act(x)
        for size in self.sizes:
            x = nn.Dense(size)(x)
        return self.head(x) if self.head is not None else x


class WithOwnConfig(nn.Module):
    """A module whose class defines its own get_config / from_config."""

    sizes: tuple = (3,)

    def get_config(self):
        return {"widths": list(self.sizes)}

    @classmethod
    def from_config(cls, config):
        return cls(sizes=tuple(config["widths"]))

    @nn.compact
    def __call__(self, x):
        for size in self.sizes:
            x = nn.Dense(size)(x)
        return x


def encode_wrapper(module, inputs, training):
    return module.encode(inputs)


def stateful_init_importable(rng, inputs):
    return stateful_init(rng, inputs)


class MaskRecorder(nn.Module):
    """Keeps the dropout mask of its last training call in its state."""

    size: int = 64

    @nn.compact
    def __call__(self, x, training=False):
        ones = jnp.ones((self.size,))
        mask = nn.Dropout(0.5, deterministic=not training)(ones)
        last = self.variable("masks", "last", lambda: ones)
        if training:
            last.value = mask
        return nn.Dense(1)(x) * mask.mean()


class EncoderHead(nn.Module):
    """A pretrained model whose `embed` method uses the encoder only (the
    head's parameters and batch statistics are not used by it)."""

    def setup(self):
        self.encoder = nn.Dense(4)
        self.head = nn.Dense(2)
        self.head_norm = nn.BatchNorm(use_running_average=True)

    def embed(self, x):
        return nn.relu(self.encoder(x))

    def __call__(self, x):
        return self.head_norm(self.head(self.embed(x)))


class PatchEmbeddings(nn.Module):
    """A ViT's start: patches plus position embeddings for a fixed number
    of patches, so the image size must be the one it was built for."""

    patch: int = 2

    @nn.compact
    def __call__(self, x):
        p = self.patch
        x = nn.Conv(8, (p, p), strides=(p, p))(x)
        b, h, w, c = x.shape
        x = x.reshape((b, h * w, c))
        init = nn.initializers.normal(0.02)
        x = x + self.param("position", init, (1, h * w, c))
        return nn.Dense(3)(x.mean(axis=1))


def stateless_call_with_state(params, state, inputs):
    """A `call_fn` taking `state` that returns it as it came."""
    return inputs @ params["w"], state


def stateless_init(rng, inputs):
    return {"w": jax.random.normal(rng, (inputs.shape[-1], 2))}, None


def call_returning_new_state(params, state, inputs):
    return inputs @ params["w"], {"count": jnp.zeros(())}


class NumPyPositions(nn.Module):
    """NumPy on a size: fine for every concrete size, not for a symbolic
    one."""

    @nn.compact
    def __call__(self, x):
        positions = np.arange(x.shape[1], dtype="float32")
        return nn.Dense(3)(x + positions[None, :, None])


class TraceCounter:
    """A forward method counting its traces: its Python body runs once per
    trace (and per eager, unjitted call), never for a cached program."""

    def __init__(self):
        self.count = 0

    def __call__(self, module, inputs, training=False):
        self.count += 1
        return module(inputs, training=training)

    def without_training(self, module, inputs):
        self.count += 1
        return module(inputs)


class BackboneHead(nn.Module):
    """A pretrained backbone and a task head, as fine-tuning sees them."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8, name="backbone")(x))
        x = nn.relu(nn.Dense(8, name="middle")(x))
        return nn.Dense(3, name="head")(x)


def trains_head(path, value):
    """A `wrt` filter defined at the top level: saveable by import path."""
    return path[0] == "head"
