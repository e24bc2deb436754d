"""Memory and build time of keras_flax.FlaxLayer for large models.

    python benchmarks/memory.py            # everything, ~15 minutes on 2 cores
    python benchmarks/memory.py --quick    # W1-W5 and the 113M MLP only

Each measurement runs in a fresh process. Live bytes are
`sum(a.nbytes for a in jax.live_arrays())` over the parameters' bytes:
  (A) a hand-written `jax.jit` + `optax.adam` loop over the module's
      variables (after two steps);
  (B) keras_flax.FlaxLayer in `model.fit` with Keras' Adam, and
  (O) with `OptaxOptimizer(optax.adam)`;
  (C) keras.layers.FlaxLayer (linen only) with Keras' Adam.
Build time: wrap + build (`keras.Sequential([keras.Input(...), layer])`)
against plain `Module.init` (NNX: constructing the module alone, against
constructing it and wrapping it), medians over fresh processes. Also the
per-device bytes under `ModelParallel` on 8 virtual CPU devices, and the
time and peak memory to load a sharded safetensors checkpoint against
`safetensors.flax.load_file` + `nnx.update`. Prints a Markdown table and
writes it to benchmarks/results/<date>-<machine>-memory.md.
"""

# ruff: noqa: I001  (keras_flax is imported before keras on purpose)
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if "--devices" in sys.argv:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import keras_flax  # noqa: F401  (first: selects the JAX backend)
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the speed benchmark's workloads)
import charts  # noqa: E402  (redrawn from the results written)


class WideMLP(nn.Module):
    """12 x Dense(width): 12 x 3072 is 113M parameters."""

    width: int = 3072
    depth: int = 12

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return x


class WideNNX(nnx.Module):
    def __init__(self, rngs, width=3072, depth=12):
        self.layers = nnx.List(
            [nnx.Linear(width, width, rngs=rngs) for _ in range(depth)]
        )

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return x


def wide(width, depth, nnx_module=False):
    if nnx_module:
        return lambda rngs: WideNNX(rngs, width, depth)
    return lambda: WideMLP(width, depth)


# name -> (description, module factory, input shape, batch, is NNX)
MODELS = {
    **{
        name: (desc, cls, shape, batch, run.is_nnx(cls))
        for name, (desc, cls, shape, batch) in run.WORKLOADS.items()
    },
    "M113": (
        "12 x Dense 3072, linen (113M)",
        wide(3072, 12),
        (3072,),
        8,
        False,
    ),
    "N113": (
        "12 x Linear 3072, NNX (113M)",
        wide(3072, 12, True),
        (3072,),
        8,
        True,
    ),
    "M1B": (
        "16 x Dense 8192, linen (1.07B)",
        wide(8192, 16),
        (8192,),
        2,
        False,
    ),
}


def live_bytes():
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def make_module(name):
    _, factory, _, _, is_nnx = MODELS[name]
    return factory(nnx.Rngs(0)) if is_nnx else factory()


def linen_variables(name):
    _, factory, shape, _, _ = MODELS[name]
    return factory().init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)},
        jnp.ones((1, *shape)),
    )


def param_bytes(name):
    if MODELS[name][4]:
        state = nnx.state(make_module(name), nnx.Param)
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    shapes = jax.eval_shape(lambda: linen_variables(name)["params"])
    return sum(
        int(np.prod(s.shape)) * s.dtype.itemsize
        for s in jax.tree_util.tree_leaves(shapes)
    )


def batches(name, steps=2):
    _, _, shape, batch, _ = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, *shape)).astype("float32")
    y = rng.integers(0, 10, batch * steps).astype("int32")
    return x, y


def loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()


# One measurement each, in this (fresh) process.


def measure_keras(name, variant):
    """Live bytes after build and after `fit`, for B, O or C."""
    _, _, shape, batch, is_nnx = MODELS[name]
    base = live_bytes()
    if variant == "C":
        variables = linen_variables(name)
        layer = keras.layers.FlaxLayer(make_module(name), variables=variables)
        del variables
    elif is_nnx:
        layer = keras_flax.FlaxLayer(make_module(name))
    else:
        layer = keras_flax.FlaxLayer(make_module(name), seed=0)
    model = keras.Sequential([keras.Input(shape), layer])
    jax.block_until_ready([v.value for v in model.weights])
    built = live_bytes() - base
    if variant == "O":
        optimizer = keras_flax.OptaxOptimizer(optax.adam, learning_rate=1e-3)
    else:
        optimizer = keras.optimizers.Adam(1e-3)
    model.compile(
        optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = batches(name)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    return {"built": built, "fitted": live_bytes() - base}


def measure_hand_loop(name):
    """Live bytes of (A) after two steps."""
    _, _, _, batch, is_nnx = MODELS[name]
    base = live_bytes()
    tx = optax.adam(1e-3)
    if is_nnx:
        graphdef, params, rest = nnx.split(make_module(name), nnx.Param, ...)

        def forward(params, x):
            return nnx.merge(graphdef, params, rest)(x)

    else:
        variables = linen_variables(name)
        params = variables.pop("params")
        module = make_module(name)

        def forward(params, x):
            return module.apply({"params": params, **variables}, x)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(lambda p: loss(forward(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    x, y = batches(name)
    for i in range(2):
        sl = slice(i * batch, (i + 1) * batch)
        params, opt_state = step(params, opt_state, x[sl], y[sl])
    jax.block_until_ready(params)
    return {"fitted": live_bytes() - base}


def measure_build_time(name, variant):
    """Seconds to create the weights: plain Flax, or wrap + build."""
    _, factory, shape, _, is_nnx = MODELS[name]
    x = jnp.ones((1, *shape))
    start = time.perf_counter()
    if is_nnx:
        module = factory(nnx.Rngs(0))
        if variant == "B":
            keras.Sequential([keras.Input(shape), keras_flax.FlaxLayer(module)])
        out = nnx.state(module)
    elif variant == "plain":
        out = factory().init(
            {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x
        )
    else:
        layer = keras_flax.FlaxLayer(factory(), seed=0)
        model = keras.Sequential([keras.Input(shape), layer])
        out = [v.value for v in model.weights]
    jax.block_until_ready(out)
    return {"seconds": time.perf_counter() - start}


def measure_model_parallel(name):
    """Per-device bytes after build and after `fit` under ModelParallel
    (1 x 8 mesh, every kernel split along its output axis)."""
    _, _, shape, batch, _ = MODELS[name]
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 8), ["data", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*kernel"] = (None, "model")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="data"
        )
    )

    def per_device():
        # Each buffer once (an array made from per-device arrays lists
        # their buffers again).
        gc.collect()
        buffers = {}
        for array in jax.live_arrays():
            for shard in array.addressable_shards:
                data = shard.data
                key = (shard.device, data.unsafe_buffer_pointer())
                buffers[key] = data.nbytes
        held = {}
        for (device, _), size in buffers.items():
            held[device] = held.get(device, 0) + size
        return max(held.values(), default=0)

    base = per_device()
    # NNX: made whole by the user, who still holds it.
    module = make_module(name)
    layer = keras_flax.FlaxLayer(module, seed=0)
    model = keras.Sequential([keras.Input(shape), layer])
    jax.block_until_ready([v.value for v in model.weights])
    built = per_device() - base
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x, _ = batches(name)
    model.fit(
        x,
        np.zeros((len(x), shape[-1]), "float32"),
        batch_size=batch,
        epochs=1,
        verbose=0,
    )
    fitted = per_device() - base
    del module
    return {"built": built, "fitted": fitted}


def anon_mb():
    """This process's anonymous resident memory (MB): what it allocated,
    without the file pages safetensors maps in (read-only, shared)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """The peak of `anon_mb()` while the `with` block runs, sampled every
    millisecond on a thread."""

    def __enter__(self):
        import threading

        self.peak = self.start = anon_mb()
        self._done = threading.Event()

        def sample():
            while not self._done.wait(0.001):
                self.peak = max(self.peak, anon_mb())

        self._thread = threading.Thread(target=sample)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, anon_mb())


def measure_checkpoint(name, variant, folder):
    """Seconds and peak growth of allocated memory (MB) to read a sharded
    checkpoint into the NNX module: ours, or `safetensors.flax.load_file`
    + `nnx.update`."""
    module = make_module(name)
    layer = keras_flax.FlaxLayer(module) if variant == "B" else None
    index = os.path.join(folder, "model.safetensors.index.json")
    gc.collect()
    sampler = PeakSampler()
    start = time.perf_counter()
    with sampler:
        load_checkpoint(variant, layer, module, index, folder)
    return {
        "seconds": time.perf_counter() - start,
        "peak_mb": sampler.peak - sampler.start,
    }


def load_checkpoint(variant, layer, module, index, folder):
    import safetensors.flax

    if variant == "B":
        keras_flax.load_safetensors(layer, index)
        jax.block_until_ready([v.value for v in layer.weights])
    else:
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        flat = {}
        for file in files:
            flat.update(safetensors.flax.load_file(os.path.join(folder, file)))
        state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        for key, value in flat.items():
            *parents, leaf = key.split("/")
            node = state
            for part in parents:
                node = node[int(part) if part.isdigit() else part]
            node[leaf] = value
        nnx.update(module, state)
        jax.block_until_ready(nnx.state(module))


def write_checkpoint(name, folder, shards=4):
    """The NNX module's parameters in `shards` files and an index."""
    import safetensors.flax

    layer = keras_flax.FlaxLayer(make_module(name))
    params, _ = layer._weights.by_name(layer._model.live.rng_state)
    keys = list(params)
    weight_map = {}
    per_shard = -(-len(keys) // shards)
    for i in range(shards):
        chunk = keys[i * per_shard : (i + 1) * per_shard]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        safetensors.flax.save_file(
            {k: params[k].value for k in chunk}, os.path.join(folder, file)
        )
        weight_map.update(dict.fromkeys(chunk, file))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)


def measure(kind, name, variant, folder=None):
    if kind == "keras":
        return measure_keras(name, variant)
    if kind == "hand":
        return measure_hand_loop(name)
    if kind == "build":
        return measure_build_time(name, variant)
    if kind == "parallel":
        return measure_model_parallel(name)
    return measure_checkpoint(name, variant, folder)


# Results of fresh processes by their arguments and repeat, kept in a file
# (`--cache`) so that a run stopped part way resumes where it stopped.
CACHE = {"runs": {}}


def fresh(kind, name, variant="-", folder="-", devices=False, repeat=0):
    key = f"{kind} {name} {variant} {repeat}"
    if key in CACHE["runs"]:
        return CACHE["runs"][key]
    command = [sys.executable, __file__, "--case", kind, name, variant, folder]
    if devices:
        command.append("--devices")
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return None
    value = json.loads(result.stdout.strip().splitlines()[-1])
    if "path" in CACHE:
        CACHE["runs"][key] = value
        with open(CACHE["path"], "w") as f:
            json.dump(CACHE["runs"], f)
    return value


def median_of(kind, name, variant, repeats, **kwargs):
    runs = [
        fresh(kind, name, variant, repeat=i, **kwargs) for i in range(repeats)
    ]
    runs = [r for r in runs if r is not None]
    if not runs:
        return None
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def x(value, total):
    return f"{value / total:.2f}" if value is not None else "-"


def report(rows, builds, parallel, checkpoint, quick):
    lines = [
        f"# keras-flax memory and build time{', --quick' if quick else ''}",
        "",
        f"Machine: {run.machine_name()}. JAX {jax.__version__} "
        f"({jax.default_backend()}), Flax {run._version('flax')}, "
        f"Keras {keras.__version__}.",
        "",
        "Live device bytes over the parameters' bytes. A: hand-written "
        "`jax.jit` + `optax.adam` loop; B: keras_flax.FlaxLayer, Keras' "
        "Adam; O: B with `OptaxOptimizer(optax.adam)`; C: "
        "keras.layers.FlaxLayer (linen, `variables=`), Keras' Adam.",
        "",
        "| model | params (MB) | built B | built C | fit A | fit B | fit O "
        "| fit C | fit B / A | fit O / A |",
        "|" + " --- |" * 10,
    ]
    for name, r in rows.items():
        p = r["params"]
        a = (r.get("A") or {}).get("fitted")
        b, o, c = (r.get(k) or {} for k in "BOC")
        lines.append(
            f"| {name} {MODELS[name][0]} | {p / 2**20:.1f} | "
            f"{x(b.get('built'), p)} | {x(c.get('built'), p)} | {x(a, p)} | "
            f"{x(b.get('fitted'), p)} | {x(o.get('fitted'), p)} | "
            f"{x(c.get('fitted'), p)} | "
            f"{x(b.get('fitted'), a) if a else '-'} | "
            f"{x(o.get('fitted'), a) if a else '-'} |"
        )
    lines += [
        "",
        "Time to create the weights (s, cold, medians over fresh processes): "
        "plain Flax (`Module.init`; NNX: constructing the module) against "
        "wrap + build (NNX: constructing and wrapping).",
        "",
        "| model | plain Flax | keras_flax | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for name, (plain, ours) in builds.items():
        lines.append(
            f"| {name} | {plain:.2f} | {ours:.2f} | {ours / plain:.2f} |"
        )
    if parallel:
        lines += [
            "",
            "ModelParallel on 8 virtual CPU devices (1 x 8 mesh, kernels "
            "split along their output axis): the largest per-device bytes "
            "over params / 8.",
            "",
            "| model | params / 8 (MB) | after build | after fit (Adam) |",
            "| --- | --- | --- | --- |",
        ]
        for name, (p, r) in parallel.items():
            lines.append(
                f"| {name} | {p / 8 / 2**20:.1f} | {x(r['built'], p / 8)} | "
                f"{x(r['fitted'], p / 8)} |"
            )
    if checkpoint:
        lines += [
            "",
            "Reading a 4-file sharded safetensors checkpoint into the NNX "
            "module (medians over fresh processes): seconds, and the peak "
            "growth of the process's allocated memory (anonymous resident "
            "pages; the checkpoint's memory-mapped file pages left out) over "
            "the parameters' bytes.",
            "",
            "| model | load_safetensors (s) | load_file + nnx.update (s) "
            "| peak, ours | peak, load_file |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, (p, ours, theirs) in checkpoint.items():
            lines.append(
                f"| {name} | {ours['seconds']:.2f} | {theirs['seconds']:.2f} "
                f"| {ours['peak_mb'] * 2**20 / p:.2f} "
                f"| {theirs['peak_mb'] * 2**20 / p:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", nargs=4)
    parser.add_argument("--devices", action="store_true")
    parser.add_argument("--cache", help="a JSON file of results to resume")
    args = parser.parse_args()
    if args.cache:
        CACHE["path"] = args.cache
        if os.path.exists(args.cache):
            with open(args.cache) as f:
                CACHE["runs"] = json.load(f)
    if args.case:
        kind, name, variant, folder = args.case
        print(json.dumps(measure(kind, name, variant, folder)))
        return
    names = ["W1", "W2", "W3", "W4", "W5", "M113", "N113"]
    rows = {}
    for name in names:
        row = {"params": param_bytes(name), "A": fresh("hand", name)}
        for variant in "BO" + ("" if MODELS[name][4] else "C"):
            row[variant] = fresh("keras", name, variant)
        rows[name] = row
        print(f"{name} memory done", file=sys.stderr)
    repeats = 1 if args.quick else 3
    builds = {}
    for name in names + ([] if args.quick else ["M1B"]):
        plain = median_of("build", name, "plain", repeats)["seconds"]
        ours = median_of("build", name, "B", repeats)["seconds"]
        builds[name] = (plain, ours)
        print(f"{name} build done", file=sys.stderr)
    parallel = {
        name: (param_bytes(name), fresh("parallel", name, devices=True))
        for name in ("M113", "N113")
    }
    checkpoint = {}
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint("N113", folder)
        checkpoint["N113"] = (
            param_bytes("N113"),
            median_of("checkpoint", "N113", "B", repeats, folder=folder),
            median_of("checkpoint", "N113", "plain", repeats, folder=folder),
        )
    path = run.write_report(
        report(rows, builds, parallel, checkpoint, args.quick), "-memory"
    )
    charts.draw("memory", path)


if __name__ == "__main__":
    main()
