"""`model.quantize(mode)` on keras_flax.FlaxLayer, against Qwix by hand.

    python benchmarks/quantize.py            # ~3 minutes on 2 cores
    python benchmarks/quantize.py --quick    # fewer repeats

For W1 (the docs CNN), W5 (the NNX transformer block) and the digits
classifier of the demo, in float, int8 (weights and activations) and int4
(weights, per channel):
  - weight bytes: what the layer's Keras variables hold (int4 packed two
    to a byte), against Qwix's quantized parameters (int4 at half a byte);
  - latency of `model.predict` on one batch of 1 and of 64 samples (B),
    of an eager `layer(x)` (L), and of a jitted call of Qwix's quantized
    module on the same batch (Q), medians, interleaved;
  - accuracy: the digits classifier's held-out accuracy (trained 15
    epochs, as the demo); for W1 and W5 (untrained, random inputs) the
    share of samples whose top class is the float model's.
CPU integer matmuls are not faster than float ones in XLA: the latencies
say what a CPU gives, not what an accelerator would. Prints a Markdown
table and writes it to benchmarks/results/<date>-<machine>-quantize.md.
"""

# ruff: noqa: I001  (keras_flax is imported before keras on purpose)
import argparse
import datetime
import functools
import math
import os
import statistics
import sys
import time

import keras_flax  # noqa: F401  (first: selects the JAX backend)
import jax
import jax.numpy as jnp
import keras
import numpy as np
import qwix
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import demo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as speed  # noqa: E402  (the speed benchmark's workloads)

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = ("dot_general", "einsum")
MODES = {
    "float": (None, None),
    "int8": ("int8", None),
    "int4": (None, keras.quantizers.Int4QuantizationConfig(block_size=-1)),
}
QTYPES = {"int8": ("int8", "int8"), "int4": ("int4", None)}


def qwix_rules(mode):
    weight, act = QTYPES[mode]
    return [
        qwix.QuantizationRule(
            module_path=".*", weight_qtype=weight, act_qtype=act, op_names=OPS
        )
    ]


# The models: (a fresh float Keras model with its trained weights, the
# module, its input shape).


def workload_model(name):
    _, cls, shape, _ = speed.WORKLOADS[name]
    if speed.is_nnx(cls):
        layer = FlaxLayer(cls(nnx.Rngs(0)), name="net")
    else:
        layer = FlaxLayer(cls(), seed=0, name="net")
    return keras.Sequential([keras.Input(shape), layer])


def digits_models():
    """A fresh-model factory for the trained digits classifier, and its
    held-out data."""
    keras.utils.set_random_seed(0)
    (x_train, y_train), test = demo.load_digits_split(0)
    model = demo.build_model(0)
    model.fit(x_train, y_train, epochs=15, batch_size=32, verbose=0)
    weights = model.get_weights()

    def fresh():
        copy = demo.build_model(0, compile=False)
        copy.set_weights(weights)
        return copy

    return fresh, test


def layer_bytes(layer):
    return sum(
        math.prod(w.shape) * np.dtype(w.dtype).itemsize for w in layer.weights
    )


def qwix_bytes(tree):
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        bits = 4 if leaf.dtype == jnp.int4 else 8 * leaf.dtype.itemsize
        total += leaf.size * bits // 8
    return total


def qwix_call(layer, mode, sample):
    """Qwix's quantization of the layer's float module, jitted, and its
    parameters."""
    module = layer.module
    if isinstance(module, nnx.Module):
        # A copy: the layer's arrays are its own (Keras may donate them).
        graphdef, state = nnx.split(module)
        module = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
        module.eval()
        if mode != "float":
            module = qwix.quantize_model(
                module, qwix.PtqProvider(qwix_rules(mode)), sample
            )
        graphdef, state = nnx.split(module)
        call = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        return functools.partial(call, state), nnx.state(module, nnx.Param)
    variables = layer.flax_variables
    if mode != "float":
        module = qwix.quantize_model(module, qwix.PtqProvider(qwix_rules(mode)))
        abstract = jax.eval_shape(module.init, jax.random.key(0), sample)
        variables = {
            **variables,
            "params": qwix.quantize_params(
                variables["params"], abstract["params"]
            ),
        }
    call = jax.jit(module.apply)
    return functools.partial(call, variables), variables["params"]


def timed_median(runs, repeats, calls):
    """Median seconds per call of each of `runs`, interleaved."""
    for run in runs.values():
        jax.block_until_ready(run())
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(run())
            times[key].append((time.perf_counter() - start) / calls)
    return {key: statistics.median(t) for key, t in times.items()}


def measure(fresh, x_eval, y_eval, repeats):
    rows = {}
    float_top = None
    for mode, (qmode, config) in MODES.items():
        model = fresh()
        layer = next(x for x in model.layers if isinstance(x, FlaxLayer))
        sample1 = np.asarray(x_eval[:1])
        qwix_fn, qparams = qwix_call(layer, mode, jnp.asarray(sample1))
        if mode != "float":
            model.quantize(qmode, config=config)
        runs = {}
        for batch in (1, 64):
            sample = np.asarray(x_eval[:batch])
            runs[f"B{batch}"] = functools.partial(
                model.predict, sample, batch_size=batch, verbose=0
            )
            runs[f"L{batch}"] = functools.partial(layer, jnp.asarray(sample))
            runs[f"Q{batch}"] = functools.partial(qwix_fn, jnp.asarray(sample))
        times = timed_median(runs, repeats, calls=5)
        predictions = model.predict(x_eval, batch_size=64, verbose=0)
        top = predictions.reshape(len(x_eval), -1).argmax(-1)
        if y_eval is not None:
            accuracy = float((top == y_eval).mean())
        else:
            float_top = top if float_top is None else float_top
            accuracy = float((top == float_top).mean())
        rows[mode] = {
            "bytes": layer_bytes(layer),
            "qwix_bytes": qwix_bytes(qparams),
            "accuracy": accuracy,
            **times,
        }
    return rows


def report(results, quick):
    lines = [
        f"# `model.quantize` on {platform()}",
        "",
        f"{datetime.date.today()}; JAX {jax.__version__}, Keras "
        f"{keras.__version__}, Qwix {version('qwix')}"
        + (" (--quick)" if quick else ""),
        "",
        "B: `model.predict` of the quantized Keras model on one batch; "
        "L: an eager call of the layer, `layer(x)` (compiled once); "
        "Q: a jitted call of Qwix's quantization of the same module. "
        "Times in ms. Accuracy: held-out for digits; top-1 agreement "
        "with float for W1 and W5 (untrained).",
        "",
        "| model | mode | weight bytes (Q) | accuracy | B / L / Q batch 1 | "
        "B / L / Q batch 64 |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for mode, r in rows.items():
            lines.append(
                f"| {name} | {mode} | {r['bytes']:,} ({r['qwix_bytes']:,}) | "
                f"{r['accuracy']:.3f} | {ms(r['B1'])} / {ms(r['L1'])} / "
                f"{ms(r['Q1'])} | {ms(r['B64'])} / {ms(r['L64'])} / "
                f"{ms(r['Q64'])} |"
            )
    return "\n".join(lines) + "\n"


def ms(seconds):
    return f"{seconds * 1e3:.2f}"


def version(package):
    from importlib.metadata import version as installed

    return installed(package)


def platform():
    return speed.machine_name()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    results = {}
    for name in ("W1", "W5"):
        _, _, shape, _ = speed.WORKLOADS[name]
        x = np.random.default_rng(0).normal(size=(512, *shape))
        results[name] = measure(
            functools.partial(workload_model, name),
            x.astype("float32"),
            None,
            repeats,
        )
    fresh, (x_test, y_test) = digits_models()
    results["digits"] = measure(fresh, x_test, y_test, repeats)
    table = report(results, args.quick)
    print(table)
    stamp = datetime.date.today().isoformat()
    suffix = "-quick" if args.quick else ""
    path = os.path.join(HERE, "results", f"{stamp}-vm{suffix}-quantize.md")
    with open(path, "w") as f:
        f.write(table)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
