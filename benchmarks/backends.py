"""The docs' CNN (W1) in `model.fit` on the Keras backend of the process.

    KERAS_BACKEND=jax        python benchmarks/backends.py
    KERAS_BACKEND=tensorflow python benchmarks/backends.py   # tensorflow-cpu
    KERAS_BACKEND=torch      python benchmarks/backends.py   # torch

Prints one Markdown table row: per-step time of keras_flax.FlaxLayer in
`model.fit` (Adam, batch 128, 28x28x1, default settings and
`steps_per_execution=8` where the backend has it), and of the hand-written
`jax.jit(value_and_grad + optax.adam)` loop measured in the same process,
interleaved, medians over repeats.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import run  # noqa: E402  (the workloads and timers of benchmarks/run.py)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, steps = (2, 6) if args.quick else (7, 32)
    _, cls, shape, batch = run.WORKLOADS["W1"]
    backend = keras.backend.backend()
    runners = {"A": run.hand_written(cls, shape, batch, steps)}
    # PyTorch's trainer runs one step per execution.
    for spe in (1,) if backend == "torch" else (1, 8):
        model, _ = run.keras_model(cls, shape, spe=spe)
        runners[f"B{spe}"] = run.fit_runner(model, shape, batch, steps)
    med = {k: t / steps for k, t in run.interleaved(runners, repeats).items()}
    med.setdefault("B8", None)
    print("| backend | B fit step | B spe=8 | A (jax loop) | B/A | B8/A |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {backend} | {run.ms(med['B1'])} | {run.ms(med['B8'])} "
        f"| {run.ms(med['A'])} | {run.ratio(med['B1'], med['A'])} "
        f"| {run.ratio(med['B8'], med['A'])} |"
    )
    print(run.machine_name(), file=sys.stderr)


if __name__ == "__main__":
    main()
