"""Keras seed state -> JAX keys and Flax RNG-stream dicts.

Keys are raw `uint32[2]` arrays (what `jax.random.PRNGKey` returns), the
format of Keras seeds, so that a seed drawn from a Keras `SeedGenerator`
inside a jitted train step is a valid key without conversion.
"""

import random
import zlib
from typing import Any

import jax

# Streams drawn by `Module.init`, as `keras.layers.FlaxLayer` does.
INIT_STREAMS = ("params", "dropout")
# Streams fed to `Module.apply` by default. A module asking for any other
# stream (`self.make_rng("noise")`) draws from "params", through Flax's
# fallback for unknown streams, so every stream works without naming it.
CALL_STREAMS = ("dropout", "params")


def key_from_seed(seed: Any) -> Any:
    """A raw key from an int seed, or from Python's RNG when `seed` is None.

    Python's RNG is seeded by `keras.utils.set_random_seed`, so unseeded
    layers are reproducible the Keras way.
    """
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    return jax.random.key_data(jax.random.key(seed))


def stream_id(name: str) -> int:
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def stream_keys(key: Any, streams: Any) -> dict[Any, Any]:
    """One independent key for each named stream, derived from `key`."""
    return {name: jax.random.fold_in(key, stream_id(name)) for name in streams}
