"""StableHLO export: a Keras model as a serialised `jax.export` artifact.

Keras' `model.export` writes SavedModel and ONNX; `export_stablehlo` is the
same call for the format Flax recommends: the inference function
`model(inputs, training=False)` with the weights inside, traced with
symbolic sizes for unknown dimensions and written by `jax.export`. The
artifact carries its input signature and runs with JAX alone.
"""

import os
from typing import Any

import jax
import keras

from keras_flax import _backends
from keras_flax._errors import describe
from keras_flax._model import PyTree


def export_stablehlo(
    model: keras.Model,
    filepath: str,
    input_signature: Any = None,
    platforms: Any = None,
    verbose: Any = None,
) -> Any:
    """Writes `model`'s inference function as a serialised StableHLO artifact.

    Args:
        model: a Keras model (or layer) on the JAX backend, built.
        filepath: where the artifact is written (`bytes` of
            `jax.export.Exported.serialize()`).
        input_signature: a structure of `keras.InputSpec`,
            `jax.ShapeDtypeStruct` or Keras tensors, as `model` takes its
            inputs; `None` sizes are exported symbolically (the first axis
            of every input is one batch dimension). Defaults to what a
            functional or `Sequential` model was built with, any batch size.
        platforms: the platforms the artifact serves on, e.g.
            `("cpu", "cuda")`; defaults to the current one.
        verbose: whether to print what was written (default True, as
            `model.export`).

    Returns:
        The `jax.export.Exported`. Load and run it with JAX alone:
        `jax.export.deserialize(bytearray(data)).call(x)`.

    Raises:
        ValueError: the backend is not JAX, `input_signature` holds no
            shapes and dtypes, or it is None for a model that was not built
            with inputs (a subclassed model: give `input_signature`).

    Examples:
        >>> import os, tempfile, jax, keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> path = os.path.join(tempfile.mkdtemp(), "m.stablehlo")
        >>> exported = export_stablehlo(model, path, verbose=False)
        >>> with open(path, "rb") as f:
        ...     served = jax.export.deserialize(bytearray(f.read()))
        >>> x = np.ones((5, 3), "float32")
        >>> np.allclose(served.call(x), model.predict(x, verbose=0), atol=1e-6)
        True
    """
    if _backends.name() != "jax":
        raise ValueError(export_backend(_backends.name()))
    if input_signature is None:
        input_signature = _model_input(model)
    leaves = jax.tree_util.tree_leaves(input_signature)
    if not leaves or not all(
        hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves
    ):
        raise ValueError(bad_input_signature(input_signature))
    specs = _backends.symbolic_structs(input_signature)

    variables = list(model.variables)

    def serve(inputs: PyTree) -> Any:
        # The weights' current values become the artifact's constants,
        # behind an optimization barrier: XLA computes with them as
        # `predict` does with its parameters, not folding them into the
        # program (an int8 activation rounded once otherwise differs). A
        # `StatelessScope` keeps any state update from being written.
        values = jax.lax.optimization_barrier([v.value for v in variables])
        mapping = list(zip(variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return model(inputs, training=False)

    exported = jax.export.export(jax.jit(serve), platforms=platforms)(specs)
    filepath = os.fspath(filepath)
    with open(filepath, "wb") as f:
        f.write(exported.serialize())
    if verbose is None or verbose:
        print(
            f"Saved StableHLO artifact at '{filepath}': inputs "
            f"{exported.in_avals}, platforms {exported.platforms}."
        )
    return exported


def export_backend(backend_name: str) -> str:
    return (
        "`export_stablehlo` writes `jax.export` artifacts, on the JAX "
        f"backend only. Received: backend={backend_name!r}. Fix: set "
        "`KERAS_BACKEND=jax` before importing Keras, or on this backend use "
        '`model.export(path, format="tf_saved_model")`.'
    )


def bad_input_signature(input_signature: Any) -> str:
    return (
        "`input_signature` must be a structure of `keras.InputSpec`, "
        "`jax.ShapeDtypeStruct` or Keras tensors, as the model takes its "
        f"inputs. Received: input_signature={describe(input_signature)}. "
        "Fix: e.g. `input_signature=keras.InputSpec(shape=(None, 5))` for "
        "one input of 5 features, any batch size."
    )


def _model_input(model: keras.Model) -> Any:
    """The specs of what `model` takes, any batch size: `model.input`
    (functional models) or `model.inputs` (a `Sequential` model)."""
    try:
        inputs = model.input
    except (AttributeError, ValueError):
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError(export_without_signature(model)) from None
        inputs = inputs[0] if len(inputs) == 1 else list(inputs)
    return jax.tree_util.tree_map(
        lambda x: keras.InputSpec(shape=(None, *x.shape[1:]), dtype=x.dtype),
        inputs,
    )


def export_without_signature(model: keras.Model) -> str:
    return (
        "`export_stablehlo` needs `input_signature` for a model without "
        f"`model.input`. Received: model={describe(model)}, "
        "input_signature=None. Fix: pass the inputs' specs, e.g. "
        "`input_signature=keras.InputSpec(shape=(None, 5))` (None: any "
        "size), or "
        "build the model as a functional or `Sequential` model with "
        "`keras.Input`."
    )
