"""Modules built from a description, for property-based tests.

A description is a tuple of blocks, each a tuple: ("dense", features),
("layernorm",), ("batchnorm",), ("dropout", rate), ("conv", features,
kernel), ("attention", heads). Blocks act on sequences (batch, time,
features); the output is averaged over time.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


def combine(inputs):
    """A tuple or dict of arrays, concatenated along the features."""
    leaves = jax.tree_util.tree_leaves(inputs)
    return jnp.concatenate(leaves, axis=-1) if len(leaves) > 1 else leaves[0]


class Stack(nn.Module):
    blocks: tuple
    dtype: Any = jnp.float32
    vocab: int = 0  # > 0: integer token ids in, through nn.Embed

    @nn.compact
    def __call__(self, inputs, training=False):
        if self.vocab:
            x = nn.Embed(self.vocab, 4, dtype=self.dtype)(inputs)
        else:
            x = combine(inputs).astype(self.dtype)
        for kind, *args in self.blocks:
            if kind == "dense":
                x = nn.relu(nn.Dense(args[0], dtype=self.dtype)(x))
            elif kind == "layernorm":
                x = nn.LayerNorm(dtype=self.dtype)(x)
            elif kind == "batchnorm":
                x = nn.BatchNorm(
                    use_running_average=not training, dtype=self.dtype
                )(x)
            elif kind == "dropout":
                x = nn.Dropout(args[0], deterministic=not training)(x)
            elif kind == "conv":
                x = nn.Conv(args[0], (args[1],), dtype=self.dtype)(x)
            elif kind == "attention":
                x = nn.SelfAttention(
                    num_heads=args[0],
                    qkv_features=2 * args[0],
                    dtype=self.dtype,
                    deterministic=True,
                )(x)
        return x.mean(axis=1)


class NNXStack(nnx.Module):
    def __init__(self, blocks, in_features, *, rngs):
        self.layers = nnx.List()
        features = in_features
        for kind, *args in blocks:
            if kind == "dense":
                layer = nnx.Linear(features, args[0], rngs=rngs)
                features = args[0]
            elif kind == "layernorm":
                layer = nnx.LayerNorm(features, rngs=rngs)
            elif kind == "batchnorm":
                layer = nnx.BatchNorm(features, rngs=rngs)
            elif kind == "dropout":
                layer = nnx.Dropout(args[0], rngs=rngs)
            elif kind == "conv":
                layer = nnx.Conv(features, args[0], (args[1],), rngs=rngs)
                features = args[0]
            else:
                layer = nnx.MultiHeadAttention(
                    num_heads=args[0],
                    in_features=features,
                    qkv_features=2 * args[0],
                    decode=False,
                    rngs=rngs,
                )
            self.layers.append(layer)

    def __call__(self, inputs):
        x = combine(inputs)
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, nnx.Linear):
                x = nnx.relu(x)
        return x.mean(axis=1)
