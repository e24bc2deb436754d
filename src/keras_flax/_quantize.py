"""`layer.quantize(mode)` (Keras' protocol) through Qwix.

Data flows one way: Keras' mode and config -> `rules` (Qwix
`QuantizationRule`s) -> the model's `Quantization.quantize` (Qwix's
post-training quantization of the wrapped module, linen or NNX, at the
layer's current values, see `linen_module` / `nnx_module`) -> a `Model`
holding the quantized arrays -> `stored` (what Keras variables cannot hold,
int4 and float8, held as int8 bits) -> the layer's new weights.

Qwix is optional (the `quantize` extra): it is imported when a layer is
quantized.
"""

import dataclasses
import functools
import importlib
import inspect
import math
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Mapping
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import keras

from keras_flax import _backends
from keras_flax import _user_code
from keras_flax import _variables
from keras_flax._errors import describe
from keras_flax._errors import quoted
from keras_flax._model import Model
from keras_flax._model import PyTree
from keras_flax._model import UserFormat

# The operations quantized, as Keras quantizes `Dense` and `EinsumDense`
# and leaves convolutions float (Qwix's convolution needs the weights and
# activations of one type).
OPS = ("dot_general", "einsum")

# What each mode quantizes weights (and activations, where the config has
# an activation quantizer) to.
_QTYPES = {"int8": "int8", "int4": "int4", "float8": "float8_e4m3fn"}


def qwix() -> Any:
    """The `qwix` module; refused, naming the extra, where it is missing."""
    try:
        return importlib.import_module("qwix")
    except ImportError as missing:
        raise ImportError(qwix_missing()) from missing


def qwix_missing() -> str:
    return (
        "Quantizing a Flax layer (`model.quantize`, `layer.quantize`) needs "
        "the `qwix` package, which is not installed. Install it: "
        '`pip install "keras-flax[quantize]"` (or `pip install qwix`).'
    )


def rules(
    layer_name: str,
    mode: str,
    config: Any,
    float_paths: Collection[str],
    tiles: Mapping[str, int | None] | None = None,
) -> list[Any]:
    """Qwix's rules for Keras' `mode` and `config` (a resolved
    `keras.quantizers.QuantizationConfig`), with the modules at
    `float_paths` (`/`-joined, LoRA adapters) left float and the modules
    of `tiles` quantized in blocks of that size (None: per channel).

    Raises:
        NotImplementedError: a mode Qwix has no post-training form of.
        ValueError: a config argument that has no Qwix equivalent.
    """
    if mode not in _QTYPES:
        raise NotImplementedError(
            quantize_mode_not_implemented(layer_name, mode)
        )
    qtype = _QTYPES[mode]
    weight_quantizer = getattr(config, "weight_quantizer", None)
    if weight_quantizer is not None:
        raise ValueError(
            quantizer_not_supported(
                layer_name, "weight_quantizer", weight_quantizer
            )
        )
    activations = getattr(config, "activation_quantizer", None)
    if activations is not None and not isinstance(
        activations, keras.quantizers.AbsMaxQuantizer
    ):
        raise ValueError(
            quantizer_not_supported(
                layer_name, "activation_quantizer", activations
            )
        )
    act_qtype = None
    if activations is not None or mode == "float8":
        act_qtype = "int8" if mode == "int4" else qtype
    rule = qwix().QuantizationRule

    def quantizing(module_path: str, tile_size: int | None) -> Any:
        return rule(
            module_path=module_path,
            weight_qtype=qtype,
            act_qtype=act_qtype,
            tile_size=tile_size,
            op_names=OPS,
        )

    return [
        *(rule(module_path=_exact(path)) for path in float_paths),
        *(
            quantizing(_exact(path), tile)
            for path, tile in (tiles or {}).items()
        ),
        quantizing(".*", None),
    ]


def quantize_mode_not_implemented(layer_name: str, mode: str) -> str:
    return (
        f"Layer '{layer_name}' does not implement quantization mode "
        f"{mode!r}: Flax layers are quantized by Qwix's post-training "
        "quantization, in the modes 'int8', 'int4' and 'float8'. It stays "
        "float. Quantize it in one of them (`layer.quantize('int8')`), or "
        "leave it out with `model.quantize(..., filters=...)`."
    )


def quantizer_not_supported(layer_name: str, arg: str, value: Any) -> str:
    return (
        f"Layer '{layer_name}' cannot honour the quantization config's "
        f"`{arg}`: Qwix quantizes with its own absmax calibration (per "
        "channel for weights, per token for activations, as Keras' default "
        f"`AbsMaxQuantizer`s). Received: {arg}={describe(value)}. Leave "
        f"`{arg}` at its default (or, for activations, None for "
        "weight-only quantization)."
    )


def _block_size(mode: str, config: Any) -> int | None:
    """The int4 block size of `config`; None for per channel (or another
    mode)."""
    block_size = getattr(config, "block_size", None)
    if mode != "int4" or block_size in (None, -1):
        return None
    return block_size


def tiles(
    layer_name: str,
    float_params: PyTree,
    per_channel: PyTree,
    block_size: int,
    module_path: Callable[[tuple[str, ...]], str],
) -> dict[str, int | None]:
    """The block size of each quantized module, as Keras' `Dense` groups
    its int4 kernel: per channel (one block) where the contracted size is
    at most `block_size`, in blocks where `block_size` divides it.

    `per_channel` is the parameters quantized per channel, whose scales
    show which axes contract (a scale of size 1 on an axis of more);
    Qwix blocks the last of them. `module_path` names the module holding a
    weight (its path parts), as Qwix's rules match it.

    Raises:
        ValueError: a contracted size `block_size` does not divide (Qwix
            has no uneven blocks).
    """
    weights = _quantized_arrays(float_params, per_channel)
    found: dict[str, int | None] = {}
    uneven = []
    for parts, (qvalue, scale) in weights.items():
        contracted = [
            size
            for size, scaled in zip(qvalue, scale, strict=True)
            if scaled == 1 and size > 1
        ]
        if not contracted:
            continue
        size = contracted[-1]
        if size <= block_size:
            tile = None
        elif size % block_size == 0:
            tile = block_size
        else:
            uneven.append((_variables.path_text(parts), size))
            continue
        module = module_path(parts)
        # A module with weights of both kinds: per channel for all.
        found[module] = tile if found.get(module, tile) == tile else None
    if uneven:
        raise ValueError(uneven_blocks(layer_name, block_size, uneven))
    return found


def uneven_blocks(
    layer_name: str, block_size: int, weights: Sequence[tuple[str, int]]
) -> str:
    shown = ", ".join(
        f"{path} (contracted size {size})" for path, size in weights
    )
    return (
        f"Layer '{layer_name}' cannot be quantized to int4 in blocks of "
        f"{block_size}: Qwix quantizes in whole blocks, and {block_size} "
        f"does not divide the contracted size of {shown}. Nothing was "
        "changed. Quantize per channel (`model.quantize(config=keras."
        "quantizers.Int4QuantizationConfig(block_size=-1))`), or give a "
        "`block_size` that divides these sizes."
    )


def _quantized_arrays(
    float_params: PyTree, quantized: PyTree
) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]]:
    """`weight path parts -> (qvalue shape, scale shape)` of each weight
    quantized (its leaves `<weight>/array/qvalue` and `.../scale`, an NNX
    Variable's ending in `value`)."""
    had = {text for _, _, text in _variables.keyed_leaves(float_params)}
    shapes: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}
    for parts, leaf, text in _variables.keyed_leaves(quantized):
        if text in had:
            continue
        if parts and parts[-1] == "value":
            parts = parts[:-1]
        if len(parts) > 2 and parts[-2] == "array":
            shapes.setdefault(parts[:-2], {})[parts[-1]] = tuple(leaf.shape)
    return {
        weight: (found["qvalue"], found["scale"])
        for weight, found in shapes.items()
        if "qvalue" in found and "scale" in found
    }


def _exact(path: str) -> str:
    """A regex matching exactly the module path `path`."""
    return "".join(f"[{c}]" if not c.isalnum() else c for c in path)


def provider(rules: list[Any]) -> Any:
    """Qwix's post-training `PtqProvider` for `rules`, its `dot_general`
    taking JAX's newer arguments where it does not.

    JAX 0.12's `jnp.matmul` and `jnp.dot` call `lax.dot_general` with
    `reduction_order=None`; Qwix 0.1.8 replaces `lax.dot_general` inside
    the quantized method by a function without that argument, so every
    `x @ w` in a quantized module (`nnx.LoRALinear`'s adapters) fails.
    Where JAX's `dot_general` has arguments Qwix's lacks, the provider's
    takes them: left at their default (None), which means what calling
    without them means, they are dropped; any other value is refused.
    Where Qwix takes them itself, its provider is used as it is.
    """
    made = qwix().PtqProvider(rules)
    missing = _arguments(jax.lax.dot_general) - _arguments(made.dot_general)
    if missing:
        made.dot_general = _dropping_defaults(made.dot_general, missing)
    return made


def _arguments(function: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(function).parameters)


def _dropping_defaults(
    dot_general: Callable[..., Any], names: Collection[str]
) -> Callable[..., Any]:
    """`dot_general` taking the keyword arguments `names` it lacks, as
    None only."""

    @functools.wraps(dot_general)
    def taking(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in names if name in kwargs}
        chosen = sorted(name for name, v in given.items() if v is not None)
        if chosen:
            raise NotImplementedError(
                qwix_argument(chosen, metadata.version("qwix"), jax.__version__)
            )
        return dot_general(*args, **kwargs)

    return taking


def qwix_argument(names: list[str], qwix: str, jax: str) -> str:
    return (
        "The quantized module calls `jax.lax.dot_general` with "
        f"{', '.join(f'`{n}`' for n in names)} set, which Qwix {qwix} cannot "
        f"take (JAX {jax} has it). Received: {', '.join(names)} not None. "
        "Leave it unset in the module's call, or quantize with a Qwix "
        "release that takes it."
    )


def linen_module(module: Any, method_name: str, rules: list[Any]) -> Any:
    """Qwix's quantized copy of a linen module (its `method_name`)."""
    return _user_code.user_code(qwix().quantize_model)(
        module, provider(rules), methods=(method_name,)
    )


def linen_params(params: PyTree, abstract: PyTree) -> PyTree:
    """The float linen `params` collection quantized as the quantized
    module's `init` output `abstract` (shapes) says."""
    return _user_code.user_code(qwix().quantize_params)(params, abstract)


def nnx_module(
    module: Any,
    method_name: str,
    rules: list[Any],
    inputs: PyTree,
    **kwargs: Any,
) -> Any:
    """Qwix's quantized copy of an NNX module, made by one call of its
    `method_name` on `inputs` (with keyword arguments `kwargs`)."""
    return _user_code.user_code(qwix().quantize_model)(
        module, provider(rules), inputs, methods=(method_name,), **kwargs
    )


def method(module: Any, method: Any) -> tuple[str, Any]:
    """`(name, target)`: the name of the method Qwix intercepts, and the
    `method` to call on the quantized copy of `module` (a subclass whose
    method of that name Qwix replaced).

    `method` is None, a name, or a function taking the module first; a
    function that is a method of `module`'s class is called by its name
    (the quantized one), another goes on calling the module's `__call__`.
    """
    if method is None or isinstance(method, str):
        return method or "__call__", method
    name = getattr(method, "__name__", "")
    on_class = getattr(type(module), name, None)
    if on_class is not None and on_class is getattr(method, "__func__", method):
        return name, name
    return "__call__", method


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A model quantized by `quantized`.

    Attributes:
        model: the quantized `Model`, its `params` / `state` the arrays to
            hold (int4 and float8 leaves as int8 bits), `wrapped` the
            quantized module (Qwix's copy), which the layer's `module`
            gives from then on.
        frozen: the paths (`VariableTree.paths`) of the quantized leaves,
            which do not train.
    """

    model: Model
    frozen: frozenset[str]


def quantized(
    model: Model,
    layer_name: str,
    mode: str,
    config: Any,
    values: tuple[PyTree, PyTree],
    inputs: PyTree,
) -> Quantized:
    """`model` quantized by Qwix at its current `values` (`(params,
    state)`), run on `inputs` where Qwix needs a call.

    Raises:
        NotImplementedError: the model has nothing Qwix quantizes (as a
            native layer without the mode), or is of a kind without it.
        ValueError: Qwix refuses the module under this mode.
    """
    if _backends.name() != "jax":
        raise NotImplementedError(
            quantize_backend(layer_name, _backends.name())
        )
    quantization = model.quantization
    label = model.diagnostics.label
    if quantization is None:
        raise NotImplementedError(
            quantize_kind_not_implemented(layer_name, label)
        )
    params, state = values
    float_paths = quantization.float_paths
    try:
        block_size = _block_size(mode, config)
        found = None
        if block_size is not None:
            per_channel = quantization.quantize(
                rules(layer_name, mode, config, float_paths),
                params,
                state,
                inputs,
            )
            found = tiles(
                layer_name,
                params,
                per_channel.params,
                block_size,
                quantization.module_path,
            )
        qrules = rules(layer_name, mode, config, float_paths, found)
        result = quantization.quantize(qrules, params, state, inputs)
    except _user_code.UserCodeError as refused:
        raise ValueError(
            quantize_refused(layer_name, label, mode, refused.error)
        ) from refused.error
    frozen = _new_paths(params, result.params)
    if not frozen:
        raise NotImplementedError(
            nothing_to_quantize(layer_name, label, mode, OPS)
        )
    result = result.replace(config=model.config, quantization=None)
    return Quantized(model=stored(result), frozen=frozen)


def quantize_kind_not_implemented(layer_name: str, label: str) -> str:
    return (
        f"Layer '{layer_name}' ({label}) does not implement quantization: "
        "only Flax modules (linen and NNX, in `FlaxLayer`) are quantized, "
        "through Qwix. It stays float. To quantize it, wrap it as a Flax "
        "module, or apply Qwix to your functions yourself."
    )


def quantize_refused(
    layer_name: str, label: str, mode: str, error: BaseException
) -> str:
    return (
        f"Layer '{layer_name}' ({label}) cannot be quantized in mode "
        f"{mode!r}: Qwix refused the module: {type(error).__name__}: "
        f"{error}. Nothing was changed. Quantize in another mode, or leave "
        "the layer out with `model.quantize(..., filters=...)`."
    )


def nothing_to_quantize(
    layer_name: str, label: str, mode: str, ops: Sequence[str]
) -> str:
    return (
        f"Layer '{layer_name}' ({label}) has nothing to quantize in mode "
        f"{mode!r}: Qwix quantizes the weights of its {quoted(ops)} "
        "operations (`nn.Dense`, `nnx.Linear`, `nn.Einsum`, ...), and the "
        "module runs none on a weight (convolutions and embeddings stay "
        "float, as in Keras' own layers). It stays float."
    )


def quantize_backend(layer_name: str, backend_name: str) -> str:
    return (
        f"Layer '{layer_name}' is quantized on the JAX backend only (Qwix "
        f"rewrites the module's JAX operations). Received: "
        f"KERAS_BACKEND={backend_name!r}. Quantize (and load a quantized "
        "model) with `KERAS_BACKEND=jax`; to serve elsewhere, export the "
        "quantized model (`export_stablehlo`, ONNX)."
    )


def _new_paths(before: PyTree, after: PyTree) -> frozenset[str]:
    """The leaf paths of `after` that `before` lacks (a quantized kernel's
    `kernel/array/qvalue` and `kernel/array/scale`)."""
    had = {text for _, _, text in _variables.keyed_leaves(before)}
    return frozenset(
        text for _, _, text in _variables.keyed_leaves(after) if text not in had
    )


# Storage of what Keras variables cannot hold.


def _is_int4(dtype: Any) -> bool:
    return jnp.dtype(dtype) == jnp.int4


def _is_float8(dtype: Any) -> bool:
    return jnp.dtype(dtype).itemsize == 1 and jnp.issubdtype(
        dtype, jnp.floating
    )


def pack_int4(array: Any) -> Any:
    """int4 values, two to an int8 (the first in the low four bits), flat;
    an odd count is padded with 0. Integer arithmetic, no sub-byte
    bitcast: the same on every platform and in exported programs."""
    flat = jnp.ravel(array).astype(jnp.int8)
    if flat.size % 2:
        flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.int8)])
    low, high = flat[0::2], flat[1::2]
    return jnp.left_shift(high, 4) | jnp.bitwise_and(low, 0x0F)


def unpack_int4(packed: Any, shape: tuple[int, ...]) -> Any:
    """The int4 array of `shape` that `pack_int4` packed."""
    packed = packed.astype(jnp.int8)
    # Arithmetic shifts keep the sign of each four-bit value.
    low = jnp.right_shift(jnp.left_shift(packed, 4), 4)
    high = jnp.right_shift(packed, 4)
    flat = jnp.stack([low, high], axis=-1).reshape(-1)
    return flat[: math.prod(shape)].reshape(shape).astype(jnp.int4)


@dataclasses.dataclass(frozen=True)
class _Stored:
    """How a leaf Keras cannot hold is held: its dtype and shape."""

    dtype: Any
    shape: tuple[int, ...]

    def hold(self, value: Any) -> Any:
        if _is_int4(self.dtype):
            return pack_int4(value)
        return jax.lax.bitcast_convert_type(value, jnp.int8)

    def restore(self, held: Any) -> Any:
        if _is_int4(self.dtype):
            return unpack_int4(held, self.shape)
        return jax.lax.bitcast_convert_type(held, self.dtype)


def stored(model: Model) -> Model:
    """`model` with its int4 and float8 parameters held as int8 bits:
    `apply` and the user's module (`write_back`) get them back as they
    were. Keras has no variables of these dtypes."""
    held = {}
    for _, leaf, text in _variables.keyed_leaves(model.params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and (_is_int4(dtype) or _is_float8(dtype)):
            held[text] = _Stored(jnp.dtype(dtype), tuple(leaf.shape))
    if not held:
        return model

    def over(tree: PyTree, how: Callable[[_Stored, Any], Any]) -> PyTree:
        def leaf(path: Any, value: Any) -> Any:
            found = held.get(_variables.path_text(path))
            return value if found is None else how(found, value)

        return jax.tree_util.tree_map_with_path(leaf, tree)

    inner_apply = model.apply

    def apply(
        params: PyTree, state: PyTree, rng: Any, inputs: PyTree, training: bool
    ) -> tuple[PyTree, PyTree]:
        restored = over(params, _Stored.restore)
        return inner_apply(restored, state, rng, inputs, training)

    user_format = model.user_format
    if user_format is not None and user_format.write_back is not None:
        user_format = _restoring_write_back(user_format, held)
    return model.replace(
        params=over(model.params, _Stored.hold),
        apply=apply,
        user_format=user_format,
    )


def _restoring_write_back(
    user_format: UserFormat, held: dict[str, _Stored]
) -> UserFormat:
    """`user_format` whose `write_back` restores held leaves first."""
    inner = user_format.write_back
    assert inner is not None  # the caller checked

    def write_back(parts: tuple[str, ...]) -> Callable[[Any], None] | None:
        write = inner(parts)
        found = held.get(_variables.path_text(parts))
        if write is None or found is None:
            return write
        return lambda value: write(found.restore(jnp.asarray(value)))

    return dataclasses.replace(user_format, write_back=write_back)


def policy_name(mode: str, config: Any, source: str) -> str:
    """The Keras dtype policy of a layer quantized in `mode` from the
    policy named `source`, as `keras.layers.Dense` names it."""
    if mode == "int4":
        block_size = getattr(config, "block_size", None)
        mode = f"int4/{-1 if block_size is None else block_size}"
    return f"{mode}_from_{source}"
