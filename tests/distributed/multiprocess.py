"""One process of a two-process DataParallel run on this machine (CPU).

`python -m tests.distributed.multiprocess PROCESS_ID PORT OUT` trains with
Keras' DataParallel over the devices of both processes, through JAX's own
multi-process runtime, and writes its final weights to OUT (.npz).
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_flax import FlaxLayer  # noqa: E402
from tests.distributed.scenarios import Net  # noqa: E402
from tests.distributed.scenarios import data  # noqa: E402

GLOBAL_BATCH = 16


def local_shard(x, y, process_id):
    """This process's half of every global batch of 16 rows."""
    half = GLOBAL_BATCH // 2
    rows = np.arange(len(x)).reshape(-1, 2, half)[:, process_id].ravel()
    return x[rows], y[rows]


def main(process_id, port, out):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
    )
    devices = keras.distribution.list_devices()
    assert len(devices) == 4, devices
    distribution = keras.distribution.DataParallel(devices=devices)
    distribution.auto_shard_dataset = False  # each process feeds its shard
    keras.distribution.set_distribution(distribution)
    layer = FlaxLayer(Net(), seed=0)
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x, y = local_shard(*data(), process_id)
    history = model.fit(
        x, y, batch_size=GLOBAL_BATCH // 2, epochs=2, shuffle=False, verbose=0
    )
    weights = {
        w.path: np.asarray(jax.device_get(w.value.addressable_data(0)))
        for w in layer.weights
    }
    np.savez(out, losses=np.array(history.history["loss"]), **weights)
    print("done", process_id, history.history["loss"])


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
