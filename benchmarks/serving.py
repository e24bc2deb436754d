"""Serving latency of one batch: onnxruntime, StableHLO, `model.predict`.

    python benchmarks/serving.py            # W1 and W5, batches 1 and 64
    python benchmarks/serving.py --quick

For the docs' CNN (W1) and the NNX transformer block (W5) of
benchmarks/run.py, in one process, interleaved, medians over repeats: the
time to serve one batch through (O) onnxruntime on the file of
`model.export(format="onnx")`, (S) the deserialised artifact of
`keras_flax.export_stablehlo`, jitted, run with JAX, and (K)
`model.predict`. Prints a Markdown table and writes it to
benchmarks/results/<date>-<machine>-serving.md.
"""

import argparse
import datetime
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import charts  # noqa: E402  (redrawn from the results written)
import jax  # noqa: E402
import onnxruntime  # noqa: E402
import run  # noqa: E402  (the workloads and timers of benchmarks/run.py)

import keras_flax  # noqa: E402

# Each timing covers this many batches.
CALLS = 20


def servers(name, batch, folder):
    """The three ways to serve `batch` samples of workload `name`."""
    _, cls, shape, _ = run.WORKLOADS[name]
    model, _ = run.keras_model(cls, shape)
    x, _ = run.make_data(shape, batch, 1)
    model(x)  # Keras' exporters ask for a model that was called

    onnx_path = os.path.join(folder, f"{name}.onnx")
    model.export(onnx_path, format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(onnx_path)
    (input_name,) = [i.name for i in session.get_inputs()]

    hlo_path = os.path.join(folder, f"{name}.stablehlo")
    keras_flax.export_stablehlo(model, hlo_path, verbose=False)
    with open(hlo_path, "rb") as f:
        restored = jax.export.deserialize(bytearray(f.read()))
    serve = jax.jit(restored.call)

    def calls(fn):
        def run_all():
            for _ in range(CALLS):
                fn()

        return run_all

    return {
        "O": calls(lambda: session.run(None, {input_name: x})),
        "S": calls(lambda: jax.block_until_ready(serve(x))),
        "K": calls(lambda: model.predict(x, batch_size=batch, verbose=0)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 11
    lines = [
        f"# keras-flax serving latency, {datetime.date.today()}",
        "",
        f"Machine: {run.machine_name()}. JAX {jax.__version__} "
        f"({jax.default_backend()}), onnxruntime {onnxruntime.__version__}"
        f"{', --quick' if args.quick else ''}.",
        "",
        "One batch (ms, medians of interleaved timings of "
        f"{CALLS} batches each). O: onnxruntime; S: deserialised StableHLO, "
        "jitted; K: `model.predict`.",
        "",
        "| workload | batch | O | S | K | O/K | S/K |",
        "|" + " --- |" * 7,
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name in ("W1", "W5"):
            for batch in (1, 64):
                found = servers(name, batch, folder)
                t = {
                    k: v / CALLS
                    for k, v in run.interleaved(found, repeats).items()
                }
                lines.append(
                    f"| {name} {run.WORKLOADS[name][0]} | {batch} | "
                    f"{run.ms(t['O'])} | {run.ms(t['S'])} | {run.ms(t['K'])}"
                    f" | {run.ratio(t['O'], t['K'])} | "
                    f"{run.ratio(t['S'], t['K'])} |"
                )
                print(f"{name} batch {batch} done", file=sys.stderr)
    path = run.write_report("\n".join(lines) + "\n", suffix="-serving")
    charts.draw("serving", path)


if __name__ == "__main__":
    main()
