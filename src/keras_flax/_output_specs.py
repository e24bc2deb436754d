"""The output shapes of a layer whose model refuses symbolic sizes.

Keras asks a layer for its output specs on symbolic inputs
(`compute_output_spec`); the layer traces its forward pass there with the
unknown sizes symbolic. A model refusing that (a ViT adding position
embeddings for a fixed number of patches, a module calling `len()` on its
batch) gets its shapes from sizes it accepts (`by_sizes`), or a message
saying which size to give (`refuse_unknown_batch`).

A probe is `(inputs, size) -> output specs`: the forward pass traced
abstractly with unknown sizes set to `size` (None: symbolic), raising
`_user_code.UserCodeError` where the model refuses.
"""

from collections.abc import Callable
from typing import Any

import jax
import keras

from keras_flax import _inputs
from keras_flax import _user_code
from keras_flax._errors import more
from keras_flax._model import PyTree

Probe = Callable[[PyTree, int | None], Any]


def at_accepted_sizes(
    probe: Probe,
    inputs: PyTree,
    built_size: int | None,
    layer_name: str,
    refused: _user_code.Refused,
) -> Any:
    """The output specs at the sizes the model accepts, where it refused
    symbolic sizes (`refused`); with no unknown size but the batch, the
    refusal is the model's error, said as such.

    Raises:
        ValueError: the model takes a known batch size only, or no size.
        UserCodeError: the model's error, where no size is unknown.
    """
    if not _inputs.unknown_dimensions(inputs):
        refuse_unknown_batch(probe, inputs, layer_name, refused.error)
        # No size to try: the error is the model's.
        raise _user_code.UserCodeError(refused.error) from refused.error
    return by_sizes(probe, inputs, built_size, layer_name, refused.error)


def by_sizes(
    probe: Probe,
    inputs: PyTree,
    built_size: int | None,
    layer_name: str,
    symbolic_error: Exception,
) -> Any:
    """Output specs at the sizes the model accepts (the size it was built
    at first, then `_inputs.CANDIDATE_SIZES`), the batch kept symbolic.
    An output dimension that differs between two accepted sizes is
    unknown; with one accepted size it is that size's."""
    searched = () if built_size is None else (built_size,)
    sizes = dict.fromkeys(searched + _inputs.CANDIDATE_SIZES)
    found = []
    for size in sizes:
        specs = _user_code.attempt(probe, inputs, size)
        if isinstance(specs, _user_code.Refused):
            continue  # the model refuses this size
        found.append(specs)
        if len(found) == 2:
            break
    if not found:
        raise ValueError(
            output_shape_unknown(
                layer_name,
                _inputs.unknown_dimensions(inputs),
                tuple(sizes),
                symbolic_error,
            )
        ) from symbolic_error
    return jax.tree_util.tree_map(_common_shape, *found)


def output_shape_unknown(
    layer_name: str, unknown: Any, tried: Any, error: BaseException
) -> str:
    where = ", ".join(
        f"dimension {axis}" if i == 0 else f"input {i} dimension {axis}"
        for i, axis in unknown[:6]
    ) + more(unknown, 6)
    return (
        f"Layer '{layer_name}' cannot compute its output shape: the module "
        "takes neither symbolic sizes nor any of the sizes tried "
        f"{tried} for the unknown input sizes ({where}). The module raised: "
        f"{type(error).__name__}: {error}. Received: `inputs` with those "
        "sizes unknown. Give them in full, e.g. "
        "`keras.Input(shape=(32, 32, 3))` instead of (None, None, 3)."
    )


def refuse_unknown_batch(
    probe: Probe, inputs: PyTree, layer_name: str, error: Exception
) -> None:
    """Where the model refused an unknown batch size and runs with a known
    one (it calls `len()` on its batch), says to give it."""
    shapes = [_inputs.shape_of(x) for x in jax.tree_util.tree_leaves(inputs)]
    if not any(shape and shape[0] is None for shape in shapes):
        return
    batched = jax.tree_util.tree_map(
        lambda x: keras.KerasTensor(
            (2, *_inputs.shape_of(x)[1:]), dtype=x.dtype
        ),
        inputs,
    )
    if isinstance(_user_code.attempt(probe, batched, None), _user_code.Refused):
        return  # not the batch: the module's own error
    shown = ", ".join(str(shape) for shape in shapes)
    raise ValueError(
        f"Layer '{layer_name}' cannot run its module with an unknown "
        f"batch size: on inputs of shape {shown} it raised "
        f"{type(error).__name__}: {error}; with a known "
        "batch size it runs. Received: an input whose batch size is "
        "None. Fix: give the batch size, `keras.Input(shape, "
        "batch_size=n)` (the module then runs on batches of n)."
    ) from error


def _common_shape(*tensors: Any) -> Any:
    """The Keras tensor with the dimensions all `tensors` agree on."""
    first = tensors[0]
    shape = tuple(
        dims[0] if len(set(dims)) == 1 else None
        for dims in zip(*(t.shape for t in tensors), strict=True)
    )
    return keras.KerasTensor(shape, dtype=first.dtype)
