"""Charts of the benchmarks' results, for the documentation site.

Each benchmark script writes its results as Markdown tables under
`benchmarks/results/`; this draws the newest results of each kind as SVG
files under `docs/performance/`:

- `steps.svg`: the training step time of each workload over the
  hand-written `jax.jit` + Optax loop's, for `keras_flax.FlaxLayer` (Keras'
  Adam, packed, and Optax's Adam) and the built-in `keras.layers.FlaxLayer`
  (`run.py`);
- `memory.svg`: live device bytes over the parameters' bytes, after build
  and after `fit` (`memory.py`);
- `build.svg`: the time to create the weights, plain Flax and keras_flax
  (`memory.py`);
- `serving.svg`: the latency of one batch, onnxruntime, StableHLO and
  `model.predict` (`serving.py`).

`run.py`, `memory.py` and `serving.py` redraw their charts after writing
their results; `python benchmarks/charts.py` redraws all four.
"""

import argparse
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CHARTS = os.path.join(os.path.dirname(HERE), "docs", "performance")

# Each kind of results file, by its title.
TITLES = {
    "steps": "# keras-flax benchmarks",
    "memory": "# keras-flax memory",
    "serving": "# keras-flax serving",
}


def tables(path):
    """The Markdown tables of `path`: a list of `(header, rows)`, each row a
    dict from the header's names to the cells' text."""
    found, header, rows = [], None, []
    with open(path) as f:
        lines = [line.strip() for line in f]
    for line in lines + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|- "):
                rows.append(dict(zip(header, cells, strict=True)))
        elif header is not None:
            found.append((header, rows))
            header, rows = None, []
    return found


def table_with(path, column):
    """The rows of the first table of `path` with `column`."""
    for header, rows in tables(path):
        if column in header:
            return rows
    raise ValueError(f"{path} has no table with a column {column!r}")


def newest(kind):
    """The newest results file of `kind` (by the date its name starts with,
    then by the time it was written), whose tables the charts read."""
    candidates = []
    for name in sorted(os.listdir(RESULTS)):
        path = os.path.join(RESULTS, name)
        with open(path) as f:
            if f.readline().startswith(TITLES[kind]):
                candidates.append(path)
    if not candidates:
        raise FileNotFoundError(f"no {kind} results under {RESULTS}")
    # The same date: the file written last.
    return max(
        candidates,
        key=lambda p: (os.path.basename(p)[:10], os.path.getmtime(p)),
    )


def number(cell):
    """A cell's number; None for "-" (not measured)."""
    cell = cell.replace(",", "")
    return None if cell in ("-", "—", "") else float(cell.split()[0])


def step_ratios(path):
    """`{workload: {variant: step time over the hand-written loop's}}`."""
    ratios = {}
    for row in table_with(path, "B8/A"):
        workload = row["workload"].split()[0]
        hand = number(row["A"])
        ratios[workload] = {
            label: None if number(row[col]) is None else number(row[col]) / hand
            for label, col in (
                ("keras_flax.FlaxLayer", "B8"),
                ("keras_flax, pack_weights=True", "P8"),
                ("keras_flax, OptaxOptimizer(optax.adam)", "O8"),
                ("keras.layers.FlaxLayer (built-in)", "C8"),
            )
        }
    return ratios


def memory_ratios(path):
    """`{model: {figure: live bytes over params}}`."""
    figures = {
        "after build, keras_flax": "built B",
        "after build, built-in": "built C",
        "after fit, hand-written loop": "fit A",
        "after fit, keras_flax": "fit B",
        "after fit, built-in": "fit C",
    }
    return {
        row["model"].split()[0]: {
            label: number(row[col]) for label, col in figures.items()
        }
        for row in table_with(path, "built B")
    }


def build_times(path):
    """`{model: {"plain Flax": s, "keras_flax": s}}`."""
    return {
        row["model"]: {
            "plain Flax": number(row["plain Flax"]),
            "keras_flax": number(row["keras_flax"]),
        }
        for row in table_with(path, "plain Flax")
    }


def serving_times(path):
    """`{"W1, batch 1": {runtime: ms}}`."""
    return {
        f"{row['workload'].split()[0]}, batch {row['batch']}": {
            "onnxruntime": number(row["O"]),
            "StableHLO (jitted)": number(row["S"]),
            "model.predict": number(row["K"]),
        }
        for row in table_with(path, "O/K")
    }


def bars(data, title, ylabel, filename, source, reference=None, log=False):
    """A grouped bar chart of `data` (`{group: {series: value}}`), written
    to `docs/performance/<filename>`; `reference` draws a line at it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "The charts need matplotlib: pip install -e '.[docs]'"
        ) from error
    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "keras-flax"
    groups = list(data)
    series = list(next(iter(data.values())))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, name in enumerate(series):
        xs = [
            g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))
        ]
        values = [data[group][name] for group in groups]
        shown = [
            (x, v) for x, v in zip(xs, values, strict=True) if v is not None
        ]
        ax.bar([x for x, _ in shown], [v for _, v in shown], width, label=name)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(
        fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.1)
    )
    fig.text(0.01, 0.01, f"from {os.path.basename(source)}", fontsize=6)
    fig.tight_layout()
    os.makedirs(CHARTS, exist_ok=True)
    path = os.path.join(CHARTS, filename)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    return path


def draw(kind, path=None):
    """Draws the charts of `kind` ("steps", "memory", "serving") from the
    results file `path` (default: the newest of its kind); returns the
    files written."""
    path = path or newest(kind)
    if kind == "steps":
        return [
            bars(
                step_ratios(path),
                "Training step time over the hand-written jax.jit + Optax loop "
                "(steps_per_execution=8; lower is faster)",
                "ratio",
                "steps.svg",
                path,
                reference=1.0,
            )
        ]
    if kind == "memory":
        return [
            bars(
                memory_ratios(path),
                "Live device bytes over the parameters' bytes",
                "ratio",
                "memory.svg",
                path,
            ),
            bars(
                build_times(path),
                "Time to create the weights (cold)",
                "seconds",
                "build.svg",
                path,
            ),
        ]
    if kind == "serving":
        return [
            bars(
                serving_times(path),
                "Latency of one batch",
                "ms (log scale)",
                "serving.svg",
                path,
                log=True,
            )
        ]
    raise ValueError(f"kind must be one of {sorted(TITLES)}, got {kind!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", default=sorted(TITLES))
    for kind in parser.parse_args().kinds:
        for path in draw(kind):
            print(f"drawn {path}")


if __name__ == "__main__":
    main()
