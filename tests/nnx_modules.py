"""Flax NNX modules shared by the tests."""

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.linear1 = nnx.Linear(4, 8, rngs=rngs)
        self.linear2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))

    def hidden(self, x):
        return nnx.relu(self.linear1(x))


class ConvBatchNormDropout(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = self.dropout(x)
        return self.head(x.mean(axis=(1, 2)))


class DropoutOnly(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 16, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.linear(x))


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.attention(x).mean(axis=1))


class Recurrent(nnx.Module):
    def __init__(self, rngs):
        cell = nnx.LSTMCell(in_features=3, hidden_features=5, rngs=rngs)
        self.rnn = nnx.RNN(cell)
        self.head = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x)[:, -1])


class Calls(nnx.Variable):
    """A user variable type: counts the calls."""


class WithCustomVariable(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 2, rngs=rngs)
        self.calls = Calls(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] += 1
        return self.linear(x)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.linear(x))


class Blocks(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class LazyLinear(nnx.Module):
    """Creates its kernel on the first call, from the inputs' size."""

    def __init__(self, features, rngs):
        self.features = features
        self.rngs = rngs

    def __call__(self, x):
        if not hasattr(self, "kernel"):
            shape = (x.shape[-1], self.features)
            self.kernel = nnx.Param(
                jax.random.normal(self.rngs.params(), shape)
            )
        return x @ self.kernel


class TrainingArgument(nnx.Module):
    """A method taking `training` itself."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x, training=False):
        return self.linear(x) * (2.0 if training else 1.0)


class Configurable(nnx.Module):
    """An NNX module with its own get_config / from_config."""

    def __init__(self, features, *, rngs):
        self.features = features
        self.linear = nnx.Linear(4, features, rngs=rngs)
        self.bn = nnx.BatchNorm(features, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))

    def get_config(self):
        return {"features": self.features}

    @classmethod
    def from_config(cls, config):
        return cls(config["features"], rngs=nnx.Rngs(0))


class WithArrayAttribute(nnx.Module):
    """Plain JAX arrays as attributes: data of the module, not Variables
    (a constant table, and a call counter it reassigns)."""

    def __init__(self, rngs):
        self.table = jnp.arange(4.0) / 4
        self.calls = jnp.zeros((), jnp.int32)
        self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        self.calls = self.calls + 1
        return self.linear(x + self.table)


class StackedBlock(nnx.Module):
    def __init__(self, features, *, rngs):
        self.linear = nnx.Linear(features, features, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.dropout(self.linear(x)))


class ScannedBlocks(nnx.Module):
    """Flax's `nnx.scan` docstring model: blocks made by `nnx.vmap` from
    split RNG streams (one dropout key per block), run by `nnx.scan`."""

    def __init__(self, num_layers, features, *, rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_block(rngs):
            return StackedBlock(features, rngs=rngs)

        self.blocks = create_block(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return forward(x, self.blocks)


class LoRAMLP(nnx.Module):
    """Two LoRA-wrapped linear layers (`nnx.LoRAParam` adapters)."""

    def __init__(self, rngs):
        self.linear1 = nnx.LoRALinear(4, 8, lora_rank=2, rngs=rngs)
        self.linear2 = nnx.LoRALinear(8, 3, lora_rank=2, rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))


class Tagged(nnx.Module):
    """Parameters carrying NNX tags, which string filters select."""

    def __init__(self, rngs):
        key = rngs.params()
        self.adapter = nnx.Param(jax.random.normal(key, (4, 3)), tag="tune")
        self.base = nnx.Param(jnp.ones((4, 3)))

    def __call__(self, x):
        return x @ (self.base + self.adapter)
