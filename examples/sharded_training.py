"""Data-parallel and model-parallel training of a Flax module with Keras.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/sharded_training.py

The flag gives 8 virtual CPU devices; on a machine with 8 accelerators,
leave it out. The script trains the same module three ways and prints the
losses, which agree, and where each weight lives.
"""

import keras_flax  # noqa: F401, I001  (first: selects the JAX backend)
import flax.linen as nn
import jax
import keras
import numpy as np

from keras_flax import FlaxLayer


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
        x = nn.relu(nn.Dense(256)(x))
        x = nn.Dropout(0.1, deterministic=not training)(x)
        return nn.Dense(10)(x)


def train(title):
    layer = FlaxLayer(MLP(), seed=0)
    model = keras.Sequential([keras.Input((64,)), layer])
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 64)).astype("float32")
    y = rng.integers(0, 10, 512)
    history = model.fit(x, y, batch_size=64, epochs=3, shuffle=False, verbose=0)
    losses = ", ".join(f"{loss:.6f}" for loss in history.history["loss"])
    print(f"{title}: losses {losses}")
    for weight in layer.weights:
        sharding = weight.value.sharding
        spec = getattr(sharding, "spec", "one device")
        shard = weight.value.addressable_shards[0].data.shape
        print(
            f"    {weight.path:42} {str(spec):18} "
            f"{tuple(weight.shape)} -> {shard} per device"
        )


def main():
    devices = keras.distribution.list_devices()
    print(f"{len(devices)} devices: {jax.devices()[0].platform}")
    train("one device")

    # 1. Data parallel: batches split over the devices, weights replicated.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    train("DataParallel")

    # 2. Model parallel: a LayoutMap keyed by the weights' Flax paths.
    mesh = keras.distribution.DeviceMesh(
        (2, len(devices) // 2), ["data", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*Dense_0/kernel"] = (None, "model")
    layout_map[".*Dense_1/kernel"] = ("model", None)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="data"
        )
    )
    train("ModelParallel")


if __name__ == "__main__":
    main()
