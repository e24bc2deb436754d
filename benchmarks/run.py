"""Speed of keras_flax.FlaxLayer against a hand-written loop and the built-in.

    python benchmarks/run.py            # all workloads, a few minutes
    python benchmarks/run.py --quick    # under two minutes: steps_per_execution
                                        # 8 only, first step of W1 only

In one process, interleaved, medians over repeats:
  (A) the limit: `jax.jit(value_and_grad + optax.adam)` over the module's
      variables, donated buffers, looping over device-resident batches;
  (B) keras_flax.FlaxLayer in `model.fit`, default settings and with
      `steps_per_execution=8`;
  (O) (B) with `keras_flax.OptaxOptimizer(optax.adam)`, A's optimizer;
  (C) keras.layers.FlaxLayer in `model.fit`, the same (linen only; built
      from given variables, which needs no TensorFlow).
Also: time to the end of the first training step and peak memory (each in
a fresh process), `predict` throughput, and eager `layer(x)` latency
against a jitted `module.apply`. Prints a Markdown table and writes it to
benchmarks/results/<date>-<machine>.md.
"""

# ruff: noqa: I001  (keras_flax is imported before keras on purpose)
import argparse
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import keras_flax  # noqa: F401  (first: selects the JAX backend)
import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
from flax import nnx

from keras_flax import FlaxLayer

import charts

HERE = os.path.dirname(os.path.abspath(__file__))


# Workloads.


class CNN(nn.Module):
    """W1: the Keras docs' CNN."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.Dense(200)(x)))


class MLP(nn.Module):
    """W2: 784-512-512-10."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(10)(nn.relu(nn.Dense(512)(x)))


class Deep(nn.Module):
    """W3: 64 x (Dense 32 + LayerNorm): hundreds of weight leaves."""

    @nn.compact
    def __call__(self, x):
        for _ in range(64):
            x = nn.LayerNorm()(nn.Dense(32)(x))
        return nn.Dense(10)(x)


class BNDropoutCNN(nn.Module):
    """W4: BatchNorm and Dropout, switched by `training`."""

    @nn.compact
    def __call__(self, x, training=False):
        x = nn.Conv(32, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not training)(x))
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        x = nn.Dropout(0.3, deterministic=not training)(x)
        return nn.Dense(10)(nn.relu(nn.Dense(200)(x)))


class Block(nnx.Module):
    """W5: a small NNX transformer block and a classifier head."""

    def __init__(self, rngs, dim=64):
        self.attention = nnx.MultiHeadAttention(
            num_heads=4, in_features=dim, decode=False, rngs=rngs
        )
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(dim, 10, rngs=rngs)

    def __call__(self, x):
        x = x + self.dropout(self.attention(self.norm1(x)))
        x = x + self.dropout(self.down(nnx.gelu(self.up(self.norm2(x)))))
        return self.head(x.mean(axis=1))


WORKLOADS = {
    "W1": ("docs CNN, 28x28x1, batch 128", CNN, (28, 28, 1), 128),
    "W2": ("MLP 784-512-512-10, batch 256", MLP, (784,), 256),
    "W3": ("64 x (Dense 32 + LayerNorm), batch 64", Deep, (32,), 64),
    "W4": (
        "BatchNorm + Dropout CNN, batch 128",
        BNDropoutCNN,
        (28, 28, 1),
        128,
    ),
    "W5": ("NNX transformer block, 32x64, batch 32", Block, (32, 64), 32),
}


def is_nnx(cls):
    return issubclass(cls, nnx.Module)


def make_data(shape, batch, steps):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, *shape)).astype("float32")
    y = rng.integers(0, 10, batch * steps).astype("int32")
    return x, y


def linen_variables(cls, shape):
    return cls().init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)},
        jnp.ones((1, *shape)),
    )


def loss_fn(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()


# (A) the hand-written loop.


def hand_written(cls, shape, batch, steps):
    """A compiled train step, and a function running `steps` of it."""
    tx = optax.adam(1e-3)
    if is_nnx(cls):
        graphdef, params, rest = nnx.split(cls(nnx.Rngs(0)), nnx.Param, ...)

        @jax.jit  # one trace level for all the variables NNX mutates
        def forward(params, rest, x):
            model = nnx.merge(graphdef, params, rest)
            out = model(x)
            return out, nnx.split(model, nnx.Param, ...)[2]

    else:
        variables = linen_variables(cls, shape)
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}
        module, takes_training = cls(), cls is BNDropoutCNN

        def forward(params, rest, x, key):
            kwargs = {"training": True} if takes_training else {}
            out, new = module.apply(
                {"params": params, **rest},
                x,
                rngs={"dropout": key},
                mutable=list(rest),
                **kwargs,
            )
            return out, new

    def step(params, rest, opt_state, key, x, y):
        key, sub = jax.random.split(key)

        def loss(params, rest):
            if is_nnx(cls):
                out, new = forward(params, rest, x)
            else:
                out, new = forward(params, rest, x, sub)
            return loss_fn(out, y), new

        (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(
            params, rest
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, rest, opt_state, key, value

    step = jax.jit(step, donate_argnums=(0, 1, 2, 3))
    x, y = make_data(shape, batch, steps)
    xs = jnp.asarray(x).reshape(steps, batch, *shape)
    ys = jnp.asarray(y).reshape(steps, batch)
    state = [params, rest, tx.init(params), jax.random.key(0)]

    def run():
        nonlocal state
        for i in range(steps):
            *state, value = step(*state, xs[i], ys[i])
        value.block_until_ready()

    # For breakdown.py: the compiled step on the first batch.
    run.lower = lambda: step.lower(*state, xs[0], ys[0])
    return run


# (B) and (C): Keras models.


def keras_model(
    cls, shape, builtin=False, spe=1, packed=False, optax_adam=False
):
    if is_nnx(cls):
        layer = FlaxLayer(cls(nnx.Rngs(0)), pack_weights=packed)
    elif builtin:
        layer = keras.layers.FlaxLayer(
            cls(), variables=linen_variables(cls, shape)
        )
    else:
        layer = FlaxLayer(cls(), seed=0, pack_weights=packed)
    model = keras.Sequential([keras.Input(shape), layer])
    if optax_adam:
        optimizer = keras_flax.OptaxOptimizer(optax.adam, learning_rate=1e-3)
    else:
        optimizer = keras.optimizers.Adam(1e-3)
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=spe,
    )
    return model, layer


def fit_runner(model, shape, batch, steps):
    x, y = make_data(shape, batch, steps)

    def run():
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)

    return run


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved(runs, repeats):
    """Median seconds of each of `runs`, timed in turn `repeats` times
    after one untimed call each (compilation)."""
    for run in runs.values():
        run()
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(timed(run))
    return {key: statistics.median(t) for key, t in times.items()}


def steady_state(name, repeats, steps, spes=(1, 8)):
    """Per-step seconds of each variant, interleaved, medians."""
    _, cls, shape, batch = WORKLOADS[name]
    runners = {"A": hand_written(cls, shape, batch, steps)}
    for spe in spes:
        model, _ = keras_model(cls, shape, spe=spe)
        runners[f"B{spe}"] = fit_runner(model, shape, batch, steps)
        model, _ = keras_model(cls, shape, spe=spe, packed=True)
        runners[f"P{spe}"] = fit_runner(model, shape, batch, steps)
        model, _ = keras_model(cls, shape, spe=spe, optax_adam=True)
        runners[f"O{spe}"] = fit_runner(model, shape, batch, steps)
        if not is_nnx(cls):
            model, _ = keras_model(cls, shape, builtin=True, spe=spe)
            runners[f"C{spe}"] = fit_runner(model, shape, batch, steps)
    times = interleaved(runners, repeats)
    return {key: t / steps for key, t in times.items()}


# Eager latency: each timing covers this many calls.
EAGER_CALLS = 10


def repeated(call):
    """`call` EAGER_CALLS times, or once where one call takes over 20 ms
    (the built-in's op-by-op calls), reported per call."""
    jax.block_until_ready(call())  # compile
    start = time.perf_counter()
    jax.block_until_ready(call())
    times = EAGER_CALLS if time.perf_counter() - start < 0.02 else 1

    def run():
        for _ in range(times):
            jax.block_until_ready(call())

    run.calls = times
    return run


def serving(name, repeats):
    """`predict` samples/s and eager `layer(x)` latency of B, P and C and
    of a jitted `module.apply`, interleaved."""
    _, cls, shape, batch = WORKLOADS[name]
    x, _ = make_data(shape, batch, 8)
    sample = x[:batch]
    variants = [("B", False, False), ("P", False, True)]
    if not is_nnx(cls):
        variants.append(("C", True, False))
    runs = {}
    for key, builtin, packed in variants:
        model, layer = keras_model(cls, shape, builtin=builtin, packed=packed)
        runs[f"predict_{key}"] = functools.partial(
            model.predict, x, batch_size=batch, verbose=0
        )
        runs[f"eager_{key}"] = repeated(functools.partial(layer, sample))
    runs["jit_apply"] = repeated(jitted_apply(cls, shape, sample))
    times = interleaved(runs, repeats)
    return {
        key: len(x) / t if key.startswith("predict") else t / runs[key].calls
        for key, t in times.items()
    }


def jitted_apply(cls, shape, sample):
    """A call of the module's jitted `apply` (NNX: `nnx.merge` and call)
    on its variables."""
    if is_nnx(cls):
        model = cls(nnx.Rngs(0))
        model.eval()
        graphdef, state = nnx.split(model)
        apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        return functools.partial(apply, state, sample)
    variables = linen_variables(cls, shape)
    return functools.partial(jax.jit(cls().apply), variables, sample)


def first_step(name, variant):
    """Seconds from building the model to the end of its first train step,
    and peak memory, in this (fresh) process."""
    _, cls, shape, batch = WORKLOADS[name]
    x, y = make_data(shape, batch, 1)
    start = time.perf_counter()
    if variant == "A":
        hand_written(cls, shape, batch, 1)()
    else:
        model, _ = keras_model(cls, shape, builtin=variant == "C")
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": peak_memory_mb()}


def peak_memory_mb():
    """This process's peak resident memory.

    Linux's `ru_maxrss` survives `exec`, so a child started by a large
    parent would report the parent's peak: read the child's own `VmHWM`.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def first_step_in_fresh_process(name, variant):
    result = subprocess.run(
        [sys.executable, __file__, "--first-step", name, variant],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def first_steps(name, variants, repeats):
    """Median first-step seconds and peak memory of each variant over
    `repeats` fresh processes, the variants taken in turn."""
    runs = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            result = first_step_in_fresh_process(name, v)
            if result is not None:
                runs[v].append(result)
    return {
        v: {
            field: statistics.median(r[field] for r in results)
            for field in ("seconds", "peak_mb")
        }
        if results
        else None
        for v, results in runs.items()
    }


# Report.


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def ms(seconds):
    return f"{seconds * 1e3:.2f}" if seconds else "-"


def report(results, machine, quick):
    lines = [
        f"# keras-flax benchmarks, {datetime.date.today()}",
        "",
        f"Machine: {machine}. JAX {jax.__version__} ({jax.default_backend()}),"
        f" Flax {_version('flax')}, Keras {keras.__version__}"
        f"{', --quick' if quick else ''}.",
        "",
        "Per training step (ms, medians). A: hand-written jit + optax loop; "
        "B: keras_flax.FlaxLayer in fit (Keras' Adam); P: the same with "
        "`pack_weights=True`; O: B with `OptaxOptimizer(optax.adam)`, A's "
        "optimizer; C: keras.layers.FlaxLayer in fit; "
        "1 / 8: steps_per_execution.",
        "",
        "| workload | A | B1 | B8 | P1 | P8 | O1 | O8 | C1 | C8 | B1/A "
        "| B8/A | P1/A | P8/A | O1/A | O8/A | B1/C1 | B8/C8 |",
        "|" + " --- |" * 18,
    ]
    for name, r in results.items():
        s = dict.fromkeys(("B1", "P1", "O1", "C1", "C8")) | r["steps"]
        lines.append(
            f"| {name} {WORKLOADS[name][0]} | {ms(s['A'])} | {ms(s['B1'])} | "
            f"{ms(s['B8'])} | {ms(s['P1'])} | {ms(s['P8'])} | "
            f"{ms(s['O1'])} | {ms(s['O8'])} | "
            f"{ms(s['C1'])} | {ms(s['C8'])} | "
            f"{ratio(s['B1'], s['A'])} | {ratio(s['B8'], s['A'])} | "
            f"{ratio(s['P1'], s['A'])} | {ratio(s['P8'], s['A'])} | "
            f"{ratio(s['O1'], s['A'])} | {ratio(s['O8'], s['A'])} | "
            f"{ratio(s['B1'], s['C1'])} | {ratio(s['B8'], s['C8'])} |"
        )
    lines += [
        "",
        "First training step (s, build + compile) and peak memory (MB, "
        "process RSS): medians over fresh processes "
        f"({1 if quick else 3} per variant); predict (samples/s); eager "
        "`layer(x)` latency (ms) against a jitted `module.apply` "
        f"({EAGER_CALLS} calls per timing, 1 for calls over 20 ms). All "
        "interleaved.",
        "",
        "| workload | first A | first B | first C | peak B | peak C "
        "| predict B | predict C | eager B | eager P | eager C | jit apply "
        "| eager B / jit | eager P / jit |",
        "|" + " --- |" * 14,
    ]
    for name, r in results.items():
        f, v = r["first"], r["serving"]

        def first(key, field="seconds", f=f):
            value = (f.get(key) or {}).get(field)
            if value is None:
                return "-"
            return f"{value:.0f}" if field == "peak_mb" else f"{value:.2f}"

        lines.append(
            f"| {name} | {first('A')} | {first('B')} | {first('C')} | "
            f"{first('B', 'peak_mb')} | {first('C', 'peak_mb')} | "
            f"{v['predict_B']:.0f} | "
            f"{v.get('predict_C', 0) and round(v['predict_C']) or '-'} | "
            f"{ms(v['eager_B'])} | {ms(v['eager_P'])} | "
            f"{ms(v.get('eager_C'))} | {ms(v['jit_apply'])} | "
            f"{ratio(v['eager_B'], v['jit_apply'])} | "
            f"{ratio(v['eager_P'], v['jit_apply'])} |"
        )
    return "\n".join(lines) + "\n"


def _version(package):
    from importlib.metadata import version

    return version(package)


def machine_name():
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()} ({cpu}, {os.cpu_count()} cores)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--first-step", nargs=2, metavar=("WORKLOAD", "VARIANT")
    )
    args = parser.parse_args()
    if args.first_step:
        print(json.dumps(first_step(*args.first_step)))
        return
    repeats, steps = (2, 6) if args.quick else (9, 32)
    results = {}
    for name in args.workloads.split(","):
        nnx_workload = is_nnx(WORKLOADS[name][1])
        variants = "AB" if nnx_workload else "ABC"
        if args.quick and name != "W1":
            variants = ""  # first-step runs need fresh processes: W1 only
        results[name] = {
            # --quick: steps_per_execution=8 only (the target setting).
            "steps": steady_state(
                name, repeats, steps, (8,) if args.quick else (1, 8)
            ),
            "serving": serving(name, 3 if args.quick else 11),
            "first": first_steps(name, variants, 1 if args.quick else 3),
        }
        print(f"{name} done", file=sys.stderr)
    path = write_report(report(results, machine_name(), args.quick))
    charts.draw("steps", path)


def write_report(text, suffix=""):
    """Prints `text` and writes it to
    benchmarks/results/<date>-<machine><suffix>.md; returns that path."""
    print(text)
    folder = os.path.join(HERE, "results")
    os.makedirs(folder, exist_ok=True)
    machine = platform.node().split(".")[0] or "machine"
    name = f"{datetime.date.today()}-{machine}{suffix}.md"
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    print(f"written to {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
