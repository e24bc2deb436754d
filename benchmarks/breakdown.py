"""Where a `fit` step's time goes: the compiled program against Keras' loop.

    python benchmarks/breakdown.py              # W1-W4
    python benchmarks/breakdown.py --workloads W1

For each workload, in one process, interleaved, medians over repeats (ms
per step):
  A      the hand-written loop of run.py (jit + optax, donated buffers);
  B xla  keras_flax.FlaxLayer's model: Keras' own `train_step`, jitted with
         donated state exactly as Keras' JAX trainer jits it, called in a
         plain loop on device-resident batches - the compiled program alone;
  B fit  the same model in `model.fit(steps_per_execution=8)`;
  C xla, C fit: the same for keras.layers.FlaxLayer;
  B optax loss: B fit compiled with the hand-written loop's optax loss
         instead of keras.losses.SparseCategoricalCrossentropy.
"fit - xla" is what Keras' Python loop adds per step (data adapter,
callbacks, state bookkeeping); "xla - A" is what Keras' compiled program
(its loss, metrics and optimizer) adds to the hand-written one. XLA's own
cost analysis of each compiled step (GFLOP, MB accessed) is printed too.
"""

# ruff: noqa: I001  (keras_flax is imported before keras on purpose)
import argparse

import keras_flax  # noqa: F401  (first: selects the JAX backend)
import jax
import jax.numpy as jnp
import keras
import optax

import run as bench


def keras_step(model, x, y):
    """Keras' jitted train step and its state, as the JAX trainer has them."""
    model.fit(x[:1], y[:1], batch_size=1, epochs=1, verbose=0)  # build all
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    state = jax.tree_util.tree_map(jnp.copy, state)  # donated below
    return jax.jit(model.train_step, donate_argnums=0), state


def optax_loss(labels, logits):
    """The hand-written loop's loss, as a Keras loss function."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels.astype("int32")
    ).mean()


def xla_runner(step, state, xs, ys):
    """Runs the jitted step over the batches, nothing else."""

    def run():
        nonlocal state
        for x, y in zip(xs, ys, strict=True):
            logs, state = step(state, (x, y))
        jax.block_until_ready(logs)

    return run


def cost(compiled):
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per program
        analysis = analysis[0]
    return (
        analysis.get("flops", 0) / 1e9,
        analysis.get("bytes accessed", 0) / 1e6,
    )


def breakdown(name, repeats, steps):
    _, cls, shape, batch = bench.WORKLOADS[name]
    x, y = bench.make_data(shape, batch, steps)
    xs = jnp.asarray(x).reshape(steps, batch, *shape)
    ys = jnp.asarray(y).reshape(steps, batch)
    runners = {"A": bench.hand_written(cls, shape, batch, steps)}
    costs = {"A": cost(runners["A"].lower().compile())}
    variants = ["B"] if bench.is_nnx(cls) else ["B", "C"]
    for key in variants:
        model, _ = bench.keras_model(cls, shape, builtin=key == "C", spe=8)
        step, state = keras_step(model, x, y)
        costs[key] = cost(step.lower(state, (xs[0], ys[0])).compile())

        runners[f"{key} xla"] = xla_runner(step, state, xs, ys)
        runners[f"{key} fit"] = bench.fit_runner(model, shape, batch, steps)
    model, _ = bench.keras_model(cls, shape, spe=8)
    model.compile(
        keras.optimizers.Adam(1e-3), optax_loss, steps_per_execution=8
    )
    runners["B optax loss"] = bench.fit_runner(model, shape, batch, steps)
    times = bench.interleaved(runners, repeats)
    return {k: t / steps for k, t in times.items()}, costs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W2,W3,W4")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    print(
        "| workload | A | B xla | B fit | C xla | C fit | B xla/A | B fit/A "
        "| B fit - xla | C fit - xla | B optax loss / A "
        "| GFLOP A, B, C | MB accessed A, B, C |"
    )
    print("|" + " --- |" * 13)
    for name in args.workloads.split(","):
        t, costs = breakdown(name, args.repeats, args.steps)
        ms = {k: v * 1e3 for k, v in t.items()}
        a, b, c = costs["A"], costs["B"], costs.get("C", (0, 0))
        print(
            f"| {name} | {ms['A']:.2f} | {ms['B xla']:.2f} | "
            f"{ms['B fit']:.2f} | {ms.get('C xla', 0):.2f} | "
            f"{ms.get('C fit', 0):.2f} | {t['B xla'] / t['A']:.2f} | "
            f"{t['B fit'] / t['A']:.2f} | "
            f"{ms['B fit'] - ms['B xla']:.2f} | "
            f"{ms.get('C fit', 0) - ms.get('C xla', 0):.2f} | "
            f"{t['B optax loss'] / t['A']:.2f} | "
            f"{a[0]:.2f}, {b[0]:.2f}, {c[0]:.2f} | "
            f"{a[1]:.1f}, {b[1]:.1f}, {c[1]:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
