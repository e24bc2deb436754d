"""Multi-device scenarios, run with 8 virtual CPU devices.

`python -m tests.distributed.scenarios NAME` prints one JSON line. Run in a
subprocess by `tests/distribution_test.py`, since the device count is fixed
when JAX starts.
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import keras_flax  # noqa: E402, I001  (first: selects the JAX backend)
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from keras_flax import FlaxLayer  # noqa: E402


def _spec_text(sharding):
    """A sharding's partition spec as a tuple's text (`('batch',)`), the
    same on every JAX version; other shardings as JAX prints them."""
    spec = getattr(sharding, "spec", None)
    return str(sharding) if spec is None else repr(tuple(spec))


SEEN = []  # shardings of the inputs seen inside the compiled steps


class Net(nn.Module):
    """Dense + BatchNorm + Dropout, recording its inputs' sharding."""

    @nn.compact
    def __call__(self, x, training=False):
        jax.debug.inspect_array_sharding(
            x, callback=lambda s: SEEN.append(_spec_text(s))
        )
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.9)(x)
        x = nn.Dropout(0.25, deterministic=not training)(nn.relu(x))
        return nn.Dense(4)(x)


class Partitioned(nn.Module):
    logical: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        if self.logical:
            init = nn.with_logical_partitioning(init, ("embed", "mlp"))
        else:
            init = nn.with_partitioning(init, (None, "model"))
        x = nn.relu(nn.Dense(16, kernel_init=init)(x))
        return nn.Dense(4)(x)


def data():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(64, 8)).astype("float32"),
        rng.normal(size=(64, 4)).astype("float32"),
    )


def train(module, optimizer=None, **layer_kwargs):
    layer = FlaxLayer(module, seed=0, **layer_kwargs)
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile(optimizer or keras.optimizers.SGD(0.05), "mse")
    x, y = data()
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return layer, history.history["loss"], model.predict(x, verbose=0)


def shardings(layer):
    return {
        w.path.split(f"{layer.name}/", 1)[-1]: {
            "spec": _spec_text(w.value.sharding),
            "shard": list(w.value.addressable_shards[0].data.shape),
            "replicated": w.value.sharding.is_fully_replicated,
        }
        for w in layer.weights
    }


def mesh_2x4():
    devices = keras.distribution.list_devices()
    return keras.distribution.DeviceMesh((2, 4), ["data", "model"], devices)


def model_parallel(layout_map):
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="data"
    )


def run_data_parallel():
    _, single, single_out = train(Net())
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    SEEN.clear()
    layer, losses, out = train(Net())
    return {
        "devices": jax.device_count(),
        "single": single,
        "losses": losses,
        "max_output_diff": float(np.abs(out - single_out).max()),
        "input_shardings": sorted(set(SEEN)),
        "weights": shardings(layer),
    }


def run_model_parallel():
    _, single, _ = train(Net())
    layout_map = keras.distribution.LayoutMap(mesh_2x4())
    layout_map[".*Dense_0/kernel"] = (None, "model")
    keras.distribution.set_distribution(model_parallel(layout_map))
    layer, losses, _ = train(Net())
    return {"single": single, "losses": losses, "weights": shardings(layer)}


def run_metadata():
    x, _ = data()
    results = {}
    reference = Partitioned().apply(
        nn.meta.unbox(Partitioned().init(jax.random.key(0), x[:1])), x
    )
    mesh = mesh_2x4()
    keras.distribution.set_distribution(
        model_parallel(keras.distribution.LayoutMap(mesh))
    )
    layer, _, _ = train(Partitioned())
    results["linen"] = shardings(layer)

    with nn.logical_axis_rules([("embed", None), ("mlp", "model")]):
        layer = FlaxLayer(Partitioned(logical=True), seed=0)
    layer(x)
    results["logical"] = shardings(layer)

    boxed = Partitioned().init(jax.random.key(0), x[:1])
    layer = FlaxLayer(Partitioned(), variables=boxed)
    results["given"] = shardings(layer)
    results["given_diff"] = float(np.abs(layer(x) - reference).max())

    with jax.set_mesh(mesh.backend_mesh):
        linear = nnx.Linear(
            8,
            16,
            rngs=nnx.Rngs(0),
            kernel_init=nnx.with_partitioning(
                nnx.initializers.lecun_normal(), (None, "model")
            ),
        )
    want = np.asarray(linear(x))
    layer = FlaxLayer(linear)
    results["nnx"] = shardings(layer)
    results["nnx_diff"] = float(np.abs(layer(x) - want).max())

    override = keras.distribution.LayoutMap(mesh)
    override[".*Dense_0/kernel"] = (None, None)
    keras.distribution.set_distribution(model_parallel(override))
    layer = FlaxLayer(Partitioned(), seed=0)
    layer(x)
    results["overridden"] = shardings(layer)
    return results


def run_optax():
    """`OptaxOptimizer(optax.adam)` on one device, under DataParallel and
    under ModelParallel: the losses, and the layout of each Optax moment
    of the sharded kernel."""
    import optax

    def adam():
        return keras_flax.OptaxOptimizer(optax.adam, learning_rate=1e-2)

    results = {"single": train(Net(), adam())[1]}
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    results["data_parallel"] = train(Net(), adam())[1]
    layout_map = keras.distribution.LayoutMap(mesh_2x4())
    layout_map[".*Dense_0/kernel"] = (None, "model")
    keras.distribution.set_distribution(model_parallel(layout_map))
    optimizer = adam()
    results["model_parallel"] = train(Net(), optimizer)[1]
    results["state"] = {
        v.path: {
            "spec": _spec_text(v.value.sharding),
            "replicated": v.value.sharding.is_fully_replicated,
        }
        for v in optimizer.variables
    }
    return results


if __name__ == "__main__":
    assert keras_flax.__version__
    print(json.dumps(globals()[f"run_{sys.argv[1]}"]()))
