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


class Wide(nn.Module):
    """Four 256 x 256 Dense layers (1 MiB of parameters)."""

    @nn.compact
    def __call__(self, x):
        for _ in range(4):
            x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(4)(x)


def _capture_init_programs():
    """Records each sharded init program the layers build, with its
    arguments, by wrapping `_layouts.sharded_init`."""
    from keras_flax import _layouts

    programs = []
    make = _layouts.sharded_init

    def recording(init, shardings):
        jitted = make(init, shardings)

        def run(*args):
            programs.append((jitted, args))
            return jitted(*args)

        return run

    _layouts.sharded_init = recording
    return programs


def _bytes(tree):
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


def run_sharded_init():
    """Sharded initialisation under ModelParallel on a 1 x 8 mesh: the
    compiled init's per-device memory, the shards each device holds, the
    values against the one-device build; a LayoutMap key that matches
    nothing; a safetensors checkpoint read shard by shard."""
    import warnings

    from keras_flax import _safetensors

    x, _ = data()
    x = np.pad(x, ((0, 0), (0, 248)))  # 256 features
    single = FlaxLayer(Wide(), seed=0, name="wide")
    single(x[:2])
    params = single.flax_variables["params"]

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 8), ["data", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["wide/Dense_[0-3]/kernel"] = (None, "model")
    layout_map[".*Dense_7/kernel"] = (None, "model")  # no such weight
    layout_map["Dense_1/kernel"] = (None, "model")  # no layer name: no match
    keras.distribution.set_distribution(model_parallel(layout_map))
    programs = _capture_init_programs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = FlaxLayer(Wide(), seed=0, name="wide")
        layer(x[:2])
    jitted, args = programs[0]
    memory = jitted.lower(*args).compile().memory_analysis()
    total = _bytes(params)
    sharded = sum(
        v.nbytes
        for k, v in params.items()
        if k != "Dense_4" and "kernel" in v
        for v in [v["kernel"]]
    )
    largest = max(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))

    path = "/tmp/keras_flax_sharded_init.safetensors"
    keras_flax.save_safetensors(single, path)
    whole_reads, slice_shapes = [], []
    tensor, read_slice = (
        _safetensors._Checkpoint.tensor,
        _safetensors._Checkpoint.slice,
    )

    def recording_tensor(self, key):
        whole_reads.append(key)
        return tensor(self, key)

    def recording_slice(self, key, index):
        value = read_slice(self, key, index)
        slice_shapes.append(list(value.shape))
        return value

    _safetensors._Checkpoint.tensor = recording_tensor
    _safetensors._Checkpoint.slice = recording_slice
    loaded = FlaxLayer(Wide(), seed=1, name="wide")
    loaded(x[:2])
    keras_flax.load_safetensors(loaded, path)
    loaded_diff = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(
            jax.tree_util.tree_leaves(loaded.flax_variables),
            jax.tree_util.tree_leaves(single.flax_variables),
            strict=True,
        )
    )
    return {
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "params_bytes": total,
        "sharded_bytes": sharded,
        "largest_bytes": largest,
        "weights": shardings(layer),
        "init_diff": max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(
                jax.tree_util.tree_leaves(layer.flax_variables),
                jax.tree_util.tree_leaves(single.flax_variables),
                strict=True,
            )
        ),
        "output_diff": float(np.abs(layer(x) - single(x)).max()),
        "warnings": [str(w.message) for w in caught],
        "whole_reads": sorted(whole_reads),
        "slice_shapes": slice_shapes,
        "loaded_diff": loaded_diff,
    }


class WideNNX(nnx.Module):
    """Four 512 x 512 Linear layers (4 MiB of kernels) and a head."""

    def __init__(self, rngs):
        self.blocks = nnx.List(
            [nnx.Linear(512, 512, rngs=rngs) for _ in range(4)]
        )
        self.head = nnx.Linear(512, 4, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = nnx.relu(block(x))
        return self.head(x)


def _largest_device_bytes():
    """The live bytes of the device holding the most: each buffer once (an
    array made from per-device arrays lists their buffers again)."""
    buffers = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            data = shard.data
            key = (shard.device.id, data.unsafe_buffer_pointer())
            buffers[key] = data.nbytes
    per_device = {}
    for (device, _), size in buffers.items():
        per_device[device] = per_device.get(device, 0) + size
    return max(per_device.values())


def run_nnx_sharded_memory():
    """An NNX module made whole by the user (on device 0), still held,
    wrapped under ModelParallel (1 x 8, kernels split): the largest
    per-device live bytes after build, after `fit` with Adam, and after
    `load_safetensors`."""
    import gc

    x = np.random.default_rng(0).normal(size=(16, 512)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 4)).astype("float32")
    module = WideNNX(nnx.Rngs(0))  # whole, on the default device
    state = nnx.state(module, nnx.Param)
    params = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state))
    sharded = sum(
        leaf.nbytes
        for path, leaf in nnx.to_flat_state(state)
        if path[0] == "blocks" and path[-1] == "kernel"
    )
    largest = max(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state))
    del state
    path = "/tmp/keras_flax_nnx_sharded.safetensors"
    keras_flax.save_safetensors(FlaxLayer(nnx.clone(module)), path)
    gc.collect()

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 8), ["data", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["wide/blocks/.*/kernel"] = (None, "model")
    keras.distribution.set_distribution(model_parallel(layout_map))
    layer = FlaxLayer(module, name="wide")
    model = keras.Sequential([keras.Input((512,)), layer])
    gc.collect()
    built = _largest_device_bytes()
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    gc.collect()
    fitted = _largest_device_bytes()
    keras_flax.load_safetensors(layer, path)
    gc.collect()
    loaded = _largest_device_bytes()
    kernel = module.blocks[0].kernel[...]
    return {
        "params_bytes": params,
        "sharded_bytes": sharded,
        "largest_bytes": largest,
        "built": built,
        "fitted": fitted,
        "loaded": loaded,
        "module_kernel_shard": list(kernel.addressable_shards[0].data.shape),
    }


class SmallNNX(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def run_user_copies():
    """Under ModelParallel (2 x 4, kernels split) and DataParallel, arrays
    the user holds apart from the layer survive every Keras call, each on
    the device it was made on: linen variables given, an NNX clone made
    before wrapping, values assigned to `flax_variables`, arrays given to
    `set_weights`. Returns, per case, whether every array is unchanged."""
    x, y = data()

    def copies(tree):
        return [np.array(leaf, copy=True) for leaf in jax.tree.leaves(tree)]

    def unchanged(tree, before):
        return all(
            np.array_equal(np.array(a), b)
            for a, b in zip(jax.tree.leaves(tree), before, strict=True)
        )

    def every_call(layer):
        model = keras.Sequential([keras.Input((8,)), layer])
        model.compile("adam", "mse")
        model.predict(x, verbose=0)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        model.evaluate(x, y, verbose=0)
        # (Keras 3.14's distributed `train_on_batch` needs a sample weight.)
        model.train_on_batch(x[:16], y[:16], sample_weight=np.ones(16))
        return model

    def cases():
        variables = jax.jit(Net().init)(jax.random.key(0), x[:1])
        before = copies(variables)
        every_call(FlaxLayer(Net(), variables=variables))
        yield "linen variables", unchanged(variables, before)

        module = SmallNNX(nnx.Rngs(0))
        clone = nnx.clone(module)
        before = copies(nnx.state(clone))
        every_call(FlaxLayer(module))
        yield "nnx clone", unchanged(nnx.state(clone), before)

        layer = FlaxLayer(SmallNNX(nnx.Rngs(1)))
        keras.Sequential([keras.Input((8,)), layer])
        values = nnx.state(SmallNNX(nnx.Rngs(2))).to_pure_dict()
        before = copies(values)
        layer.flax_variables = values
        every_call(layer)
        yield "flax_variables", unchanged(values, before)

        layer = FlaxLayer(SmallNNX(nnx.Rngs(1)))
        keras.Sequential([keras.Input((8,)), layer])
        given = [jax.numpy.asarray(w + 1.0) for w in layer.get_weights()]
        before = copies(given)
        layer.set_weights(given)
        every_call(layer)
        yield "set_weights", unchanged(given, before)

    layout_map = keras.distribution.LayoutMap(mesh_2x4())
    layout_map[".*kernel"] = (None, "model")
    result = {}
    for name, distribution in [
        ("model_parallel", model_parallel(layout_map)),
        ("data_parallel", keras.distribution.DataParallel()),
    ]:
        keras.distribution.set_distribution(distribution)
        result[name] = dict(cases())
    return result


if __name__ == "__main__":
    assert keras_flax.__version__
    print(json.dumps(globals()[f"run_{sys.argv[1]}"]()))
