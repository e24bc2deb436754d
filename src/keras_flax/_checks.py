"""Every "does it fit" check: arguments, signatures, inputs, variables and
returned state. Each raises one error from `_errors`, at the earliest
point, before anything is built.
"""

import collections.abc
import inspect
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
from flax import nnx

from keras_flax import _backends
from keras_flax import _errors
from keras_flax import _inputs
from keras_flax import _variables
from keras_flax._errors import describe
from keras_flax._errors import format_shape
from keras_flax._errors import more
from keras_flax._model import Model
from keras_flax._model import PyTree


def inputs_fit(inputs: PyTree, specs: Any, layer_name: str) -> None:
    """Raises if `inputs` do not fit the specs the layer was built for."""
    given = jax.tree_util.tree_leaves(inputs)
    built = specs.leaves()
    if len(given) != len(built):
        raise ValueError(
            inputs_structure_changed(
                layer_name,
                str(specs),
                _structure_text(inputs),
            )
        )
    for x, s in zip(given, built, strict=True):
        shape = _inputs.shape_of(x)
        fits = len(shape) == len(s.shape) and all(
            d is None or g is None or g == d
            for g, d in zip(shape[1:], s.shape[1:], strict=True)
        )
        if not fits:
            raise ValueError(
                inputs_misfit(
                    layer_name,
                    "shape",
                    str(specs),
                    _errors.format_shape(shape),
                )
            )
        if specs.guessed or getattr(x, "dtype", None) is None:
            continue
        dtype = _inputs.dtype_of(x)
        if _kind(dtype) != _kind(s.dtype):
            raise ValueError(
                inputs_misfit(
                    layer_name,
                    "dtype",
                    f"{_kind(s.dtype)} ({str(specs)})",
                    f"{_kind(dtype)} ({jnp.dtype(dtype)})",
                )
            )


def inputs_misfit(
    layer_name: str, what: str, expected: Any, received: Any
) -> str:
    return (
        f"`inputs` do not fit layer '{layer_name}': it was built for {what} "
        f"{expected}. Received: inputs with {what} {received}. Pass inputs "
        "like those the layer was built for, or create a new layer for "
        "these inputs."
    )


def inputs_structure_changed(
    layer_name: str, expected: Any, received: Any
) -> str:
    return (
        f"`inputs` do not fit layer '{layer_name}': it was built for inputs "
        f"structured as {expected}. Received: inputs structured as "
        f"{received}. Pass the same structure (tuple, dict, ...) on every "
        "call."
    )


def _kind(dtype: Any) -> str:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return "floating"
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return "complex"
    return "integer or bool"


def _structure_text(inputs: PyTree) -> str:
    return str(
        jax.tree_util.tree_map(
            lambda x: _errors.format_shape(_inputs.shape_of(x)), inputs
        )
    )


def compare(
    given: Any, expected: Any
) -> tuple[list[Any], list[Any], list[Any]]:
    """Differences between two PyTrees of arrays, by path.

    Returns:
        (missing, extra, mismatched): paths in `expected` but not `given`,
        paths in `given` but not `expected`, and `(path, given, expected)`
        for leaves whose shapes, or kinds of dtype (floating, integer, key),
        differ; `given` and `expected` are shapes, or dtypes where the
        shapes agree.
    """
    return compare_specs(
        _variables.specs_by_path(given), _variables.specs_by_path(expected)
    )


def compare_specs(
    given: Any, expected: Any
) -> tuple[list[Any], list[Any], list[Any]]:
    """`compare` of two dicts of path text -> `(shape, dtype)` (or None)."""
    missing = [p for p in expected if p not in given]
    extra = [p for p in given if p not in expected]
    mismatched = []
    for p in expected:
        if p not in given or None in (given[p], expected[p]):
            continue
        (g_shape, g_dtype), (e_shape, e_dtype) = given[p], expected[p]
        if tuple(g_shape) != tuple(e_shape):
            mismatched.append((p, tuple(g_shape), tuple(e_shape)))
        elif dtype_kind(g_dtype) != dtype_kind(e_dtype):
            mismatched.append((p, jnp.dtype(g_dtype), jnp.dtype(e_dtype)))
    return missing, extra, mismatched


def dtype_kind(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return "key"
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return "floating"
    return "integer or bool"


def non_array_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """`(path, leaf)` of the leaves of `tree` that are not arrays."""
    return [
        (_variables.path_text(keypath), leaf)
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if not (_variables.is_array_leaf(leaf) or _variables.is_typed_key(leaf))
    ]


def no_state(arg: str, new_state: PyTree) -> None:
    """Raises if a layer holding no state is given some to keep."""
    leaves = jax.tree_util.tree_flatten_with_path(new_state)[0]
    if leaves:
        paths = [_variables.path_text(keypath) for keypath, _ in leaves]
        raise ValueError(state_without_room(arg, paths))


def state_without_room(arg: str, paths: Sequence[str]) -> str:
    listed = ", ".join(paths[:8]) + more(paths, 8)
    return (
        f"`{arg}` returned a new state, but the layer holds no state to "
        "keep it in (it was given `state=None`, or `init_fn` returned no "
        f"state). Received: a new state with leaves {listed}. Give the "
        "layer its initial state (`state=...`, or `init_fn` returning "
        "`(params, state)`), or return `(outputs, state)` with the state "
        "unchanged."
    )


def state_structure(arg: str, new_state: PyTree, state_tree: Any) -> None:
    """Raises if `new_state` has another structure than the held state."""
    new_def = jax.tree_util.tree_structure(new_state)
    if new_def == state_tree.treedef:
        leaves = state_tree.leaves_of(new_state)
        held = state_tree.leaf_specs()
        if all(
            new is None
            or (
                np.shape(new) == tuple(shape)
                and dtype_kind(getattr(new, "dtype", None))
                in (None, dtype_kind(dtype))
            )
            for new, (shape, dtype) in zip(leaves, held, strict=True)
        ):
            return
    missing, extra, mismatched = compare(new_state, state_tree.tree)
    raise ValueError(state_structure_changed(arg, missing, extra, mismatched))


def state_structure_changed(
    arg: str, missing: Sequence[str], extra: Any, mismatched: Any
) -> str:
    lines = [
        f"The state returned by `{arg}` does not have the structure it had "
        "at initialization."
    ]
    for path, given, expected in mismatched[:5]:
        what, want = _difference(given, expected)
        lines.append(
            f"At {path} the returned array has {what} where the state holds "
            f"{want}."
        )
    if missing:
        lines.append("Missing: " + ", ".join(missing[:8]) + more(missing, 8))
    if extra:
        lines.append("Unexpected: " + ", ".join(extra[:8]) + more(extra, 8))
    lines.append(
        "Return the state with the same keys and shapes as it was given "
        "(`return outputs, new_state`); keep values that change shape, such "
        "as growing caches, outside the state."
    )
    return " ".join(lines)


def linen_variables(
    variables: PyTree, arg: str = "variables"
) -> Mapping[str, Any]:
    if not isinstance(variables, collections.abc.Mapping) or not all(
        isinstance(v, collections.abc.Mapping) for v in variables.values()
    ):
        raise TypeError(variables_not_mapping(variables, arg))
    bad = non_array_leaves(nn.meta.unbox(variables))
    if bad:
        raise TypeError(variables_not_arrays(bad, arg))
    return variables


def variables_not_mapping(variables: PyTree, arg: str = "variables") -> str:
    fix = (
        "Pass `variables=module.init(rng, x)`, or None to initialise at "
        "build time."
    )
    if arg != "variables":
        fix = f"Assign `layer.{arg} = module.init(rng, x)` (or its values)."
    return (
        f"`{arg}` must be a dict in the format returned by "
        "`module.init(...)`, e.g. {'params': {...}, 'batch_stats': {...}}. "
        f"Received: {arg}={describe(variables)}. {fix}"
    )


def variables_not_arrays(bad: Any, arg: str = "variables") -> str:
    listed = ", ".join(f"{p} = {describe(v)}" for p, v in bad[:4])
    return (
        f"`{arg}` must hold arrays only, as `module.init(...)` returns. "
        f"Received: {arg} with non-array leaves at {listed}. Pass the "
        "output of `module.init(rng, x)` (or arrays of the same structure)."
    )


def assignable(layer_name: str, given: Any, held: Any) -> None:
    """Refuses `given` (path text -> leaf) unless it has an array of the
    shape and kind of dtype of each `held` variable (path text ->
    variable), and nothing else."""
    not_arrays = [
        (path, leaf)
        for path, leaf in given.items()
        if not (_variables.is_array_leaf(leaf) or _variables.is_typed_key(leaf))
    ]
    missing, extra, mismatched = compare_specs(
        _variables.specs_of(given), _variables.specs_of(held)
    )
    if missing or extra or mismatched or not_arrays:
        raise ValueError(
            assignment_misfit(
                layer_name, missing, extra, mismatched, not_arrays
            )
        )


def assignment_misfit(
    layer_name: str,
    missing: Sequence[str],
    extra: Any,
    mismatched: Any,
    not_arrays: Any,
) -> str:
    lines = [
        f"`flax_variables` assigned to layer '{layer_name}' does not fit the "
        "variables it holds; nothing was assigned."
    ]
    if missing:
        listed = ", ".join(missing[:8]) + more(missing, 8)
        lines.append(f"Missing: {listed}.")
    if extra:
        listed = ", ".join(extra[:8]) + more(extra, 8)
        lines.append(f"Not held by the layer: {listed}.")
    for path, given, expected in mismatched[:5]:
        what, want = _difference(given, expected)
        lines.append(
            f"At {path} the given array has {what} but the layer holds {want}."
        )
    for path, value in not_arrays[:4]:
        lines.append(f"At {path} the given value is {describe(value)}.")
    lines.append(
        "Fix: assign every variable, in the format `layer.flax_variables` "
        "returns; an Orbax checkpoint restores in it with "
        "`checkpointer.restore(path, layer.flax_variables)`."
    )
    return " ".join(lines)


def layer_arguments(cls_name: str, pack_weights: bool) -> None:
    """Refuses a layer on a backend it cannot run on, or a `pack_weights`
    that is not a bool."""
    backend(cls_name)
    if not isinstance(pack_weights, bool):
        raise TypeError(not_a_bool("pack_weights", pack_weights))


def not_a_bool(arg: str, value: Any) -> str:
    return (
        f"`{arg}` must be True or False. Received: {arg}={describe(value)}. "
        f"Pass {arg}=True or {arg}=False."
    )


def backend(cls_name: str) -> None:
    """Refuses to construct a layer on a backend it cannot run on."""
    backend = keras.backend.backend()
    if backend not in _backends.SUPPORTED:
        raise ValueError(unsupported_backend(cls_name, backend))


def unsupported_backend(cls_name: str, backend_name: str) -> str:
    return (
        f"`{cls_name}` runs on the JAX, TensorFlow and PyTorch backends. "
        f"Received: KERAS_BACKEND={backend_name!r}. Set one of them before "
        "Keras is imported (`export KERAS_BACKEND=jax`), or import "
        "keras_flax before keras with KERAS_BACKEND unset."
    )


def packing_allowed() -> None:
    distribution = keras.distribution.distribution()
    if isinstance(distribution, keras.distribution.ModelParallel):
        raise ValueError(packing_under_model_parallel())


def packing_under_model_parallel() -> str:
    return (
        "`pack_weights=True` keeps each dtype's leaves in one replicated "
        "variable, so a `keras.distribution.ModelParallel` layout cannot "
        "shard them. Received: pack_weights=True under ModelParallel. Pass "
        "pack_weights=False (the default) to shard weights by their Flax "
        "paths, or use DataParallel."
    )


def stateful_result(result: Any) -> tuple[Any, Any]:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ValueError(stateful_result_message(result))
    return result[0], result[1]


def stateful_result_message(result: Any) -> str:
    return (
        "`call_fn` takes `state`, so it must return `(outputs, new_state)`. "
        f"Received: a {type(result).__name__} from call_fn. Return the new "
        "state with the outputs: `return outputs, new_state`."
    )


def nnx_class(module_class: type) -> None:
    """Refuses what is not an NNX module class."""
    if not (
        isinstance(module_class, type) and issubclass(module_class, nnx.Module)
    ):
        raise TypeError(not_an_nnx_class(module_class))


def not_an_nnx_class(module_class: type) -> str:
    return (
        "`module_class` of FlaxLayer.from_nnx must be a flax.nnx.Module "
        f"class. Received: module_class={describe(module_class)}. Pass the "
        "class and its constructor arguments: "
        "FlaxLayer.from_nnx(MLP, 784, 10, rngs=nnx.Rngs(0))."
    )


def nnx_arguments(variables: PyTree, rng_collections: Any) -> None:
    if variables is not None:
        raise ValueError(nnx_with_variables(variables))
    if rng_collections is not None:
        raise ValueError(nnx_with_rng_collections(rng_collections))


def nnx_with_variables(variables: PyTree) -> str:
    return (
        "`variables` is for linen modules: an NNX module carries its own "
        f"variables. Received: variables={describe(variables)} with an "
        "nnx.Module. Put the values into the module first "
        "(`nnx.update(module, state)`) and pass variables=None."
    )


def nnx_with_rng_collections(rng_collections: Any) -> str:
    return (
        "`rng_collections` is for linen modules: an NNX module draws from "
        "its own `nnx.Rngs`. Received: "
        f"rng_collections={rng_collections!r} with an nnx.Module. Leave it "
        "out; give the module the streams it needs when you build it, e.g. "
        "`nnx.Rngs(0, noise=1)`, or pass `seed=` to reseed them."
    )


def _as_given(
    model: Model, params: PyTree, state: PyTree
) -> list[tuple[str, PyTree]]:
    """The weights as the user gives them, by argument: in the model's own
    format where it takes them so (`UserFormat.argument`)."""
    user_format = model.user_format
    if user_format is None or user_format.argument is None:
        return [("params", params), ("state", state)]
    return [(user_format.argument, user_format.to_user(params, state))]


def unused_leaves(
    model: Model, given: Any, expected: Any, spec: Any, check_shapes: bool
) -> dict[str, dict[Any, Any]]:
    """The given leaves `model.init` does not create, by tree (`"params"`,
    `"state"`): path -> `(shape, dtype)`. Missing or mis-shaped leaves are
    refused (their shapes only when `check_shapes`).

    Args:
        model: the `Model`.
        given: `(params, state)` as given.
        expected: `(params, state)` as `init` creates them (shapes).
        spec: the input specs, for messages.
        check_shapes: whether the shapes are known.
    """
    params, state = given
    held = {
        "params": _variables.specs_by_path(params),
        "state": _variables.specs_by_path(state),
    }
    diagnostics = model.diagnostics
    if diagnostics.without_params is not None and not params and expected[0]:
        # Given weights without parameters, where `init` creates some.
        raise ValueError(diagnostics.without_params(state))
    trees = _as_given(model, params, state)
    unused = {"params": {}, "state": {}}
    for (arg, tree), (_, want) in zip(
        trees, _as_given(model, *expected), strict=True
    ):
        if tree is None or want is None:
            continue
        missing, extra, mismatched = compare(tree, want)
        if check_shapes and (missing or mismatched):
            raise ValueError(
                variables_misfit(
                    arg,
                    f"of {spec}",
                    missing,
                    mismatched,
                    diagnostics.misfit_fix.format(arg=arg),
                )
            )
        for path in extra:  # `arg` is "params", "state" or both's
            which = "state" if arg == "state" else "params"
            if path not in held[which]:
                which = "state"
            if held[which][path] is not None:  # not a static leaf
                unused[which][path] = held[which][path]
    return unused


def variables_misfit(
    arg: str, input_desc: str, missing: Sequence[str], mismatched: Any, fix: str
) -> str:
    lines = [f"`{arg}` does not fit the inputs {input_desc}."]
    for path, given, expected in mismatched[:5]:
        what, want = _difference(given, expected)
        lines.append(
            f"At {path} the given array has {what} but the module creates "
            f"{want}."
        )
    if missing:
        lines.append("Missing: " + ", ".join(missing[:8]) + more(missing, 8))
    lines.append(fix)
    return " ".join(lines)


# Keras' own layer arguments, which every layer takes.
_KERAS_LAYER_ARGUMENTS = ("name", "dtype", "trainable")


def no_layer_arguments(
    layer_class: type, module_class: Any, kwargs: dict[str, Any], api: str
) -> None:
    """Refuses, naming `layer_kwargs`, layer arguments given among a
    module's constructor arguments (`from_nnx(Net, wrt=...)`), unless the
    constructor takes that name itself."""
    layer_parameters = inspect.signature(layer_class.__init__).parameters
    layer_names = {
        name
        for name, p in layer_parameters.items()
        if name not in ("self", "module")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    } | set(_KERAS_LAYER_ARGUMENTS)
    try:
        taken = inspect.signature(module_class.__init__).parameters
    except (TypeError, ValueError):
        return  # no signature to tell: the constructor decides
    if any(p.kind is p.VAR_KEYWORD for p in taken.values()):
        return
    misplaced = sorted(k for k in kwargs if k in layer_names and k not in taken)
    if misplaced:
        given = ", ".join(f"{k}=..." for k in misplaced)
        entries = ", ".join(f"{k!r}: ..." for k in misplaced)
        raise TypeError(
            f"{api} got {given} among the constructor arguments of "
            f"{module_class.__name__}, which does not take such an "
            f"argument: {', '.join(misplaced)} belong to "
            f"{layer_class.__name__}. Received: {sorted(kwargs)}. Fix: pass "
            f"them in `layer_kwargs`: `{api}({module_class.__name__}, ..., "
            f"layer_kwargs={{{entries}}})`."
        )


def quantizable(
    layer_name: str, mode: str | None, built: bool, quantized: bool, policy: str
) -> str:
    """`layer.quantize(mode)`: a mode given (returned), the layer built and
    not yet quantized."""
    if mode is None:
        raise ValueError(quantize_mode_missing(layer_name))
    if not built:
        raise ValueError(quantize_unbuilt(layer_name, mode))
    if quantized:
        raise ValueError(quantize_again(layer_name, mode, policy))
    return mode


def _difference(given: Any, expected: Any) -> tuple[str, str]:
    if isinstance(given, tuple):
        return f"shape {format_shape(given)}", format_shape(expected)
    return f"dtype {given}", str(expected)


def quantize_mode_missing(layer_name: str) -> str:
    return (
        f"`quantize` of layer '{layer_name}' needs a mode: a string "
        '(`"int8"`, `"int4"`, `"float8"`) or a `config` '
        "(`keras.quantizers.QuantizationConfig`). Received: mode=None, "
        'config=None. Call `model.quantize("int8")`.'
    )


def quantize_unbuilt(layer_name: str, mode: str) -> str:
    return (
        f"Layer '{layer_name}' is not built yet, so it has no weights to "
        f"quantize. Received: mode={mode!r} on an unbuilt layer. Build it "
        "first (call it on a batch, or put it in a model with "
        "`keras.Input`), then quantize."
    )


def quantize_again(layer_name: str, mode: str, policy: str) -> str:
    return (
        f"Layer '{layer_name}' is already quantized (dtype policy "
        f"{policy!r}). Received: mode={mode!r}. Quantize the float model "
        "once: rebuild it from its float weights to choose another mode."
    )
