"""Every "does it fit" check: arguments, signatures, inputs, variables and
returned state. Each raises one error from `_errors`, at the earliest
point, before anything is built.
"""

import collections.abc
import dataclasses
import inspect
import warnings
from collections.abc import Callable
from collections.abc import Mapping
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
from keras_flax._model import Model
from keras_flax._model import PyTree

CALL_FN_ARGUMENTS = ("params", "state", "rng", "inputs", "training")
INIT_FN_ARGUMENTS = ("rng", "inputs", "training")
TRAINING_LIKE_FLAGS = (
    "deterministic",
    "train",
    "is_training",
    "use_running_average",
)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _parameters(fn: Callable[..., Any], arg: str) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as error:
        raise TypeError(_errors.unsignable(arg, fn)) from error


def function_arguments(
    fn: Callable[..., Any], arg: str, allowed: Any
) -> list[str]:
    """The argument names of `fn` (`call_fn` or `init_fn`), in order.

    Arguments are matched by name, as `keras.layers.JaxLayer` does: each
    must be one of `allowed`, and `inputs` is required.
    """
    if not callable(fn):
        raise TypeError(
            _errors.not_callable(arg, fn, f"Pass a function `{arg}(...)`.")
        )
    names = [p.name for p in _parameters(fn, arg)]
    for name in names:
        if name not in allowed:
            raise ValueError(
                _errors.unsupported_argument(arg, fn, name, allowed)
            )
    if "inputs" not in names:
        raise ValueError(_errors.missing_argument(arg, fn, "inputs", allowed))
    return names


@dataclasses.dataclass(frozen=True)
class MethodSignature:
    """How a Flax forward method is called: inputs first, then `training`."""

    takes_training: bool


def method_signature(
    fn: Callable[..., Any],
    method_name: str,
    call_prefix: str,
    skip_module: bool,
) -> MethodSignature:
    """Checks a Flax forward method and tells how to call it.

    The first argument after the module receives the inputs, whatever its
    name (Flax passes it positionally); `training` is passed by name when
    the method takes it. Any other argument must have a default.

    Args:
        fn: the method (bound, so without `self`) or free function.
        method_name: how to name the method in messages.
        call_prefix: how the method is called in example code, e.g.
            "module(" or "module.encode(".
        skip_module: whether the first argument of `fn` is the module.
    """
    parameters = _parameters(fn, "method")
    if skip_module:
        parameters = parameters[1:]
    positional = [
        p
        for p in parameters
        if p.kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        )
    ]
    if not positional or positional[0].name == "training":
        raise ValueError(
            _errors.method_without_inputs(method_name, call_prefix)
        )
    rest = [p for p in parameters if p is not positional[0]]
    names = {p.name for p in rest}
    takes_training = "training" in names
    example_args = _example_args(positional[0], rest)
    for p in rest:
        if p.name == "training" or p.kind in _VARIADIC:
            continue
        if p.default is inspect.Parameter.empty:
            raise ValueError(
                _errors.method_unfillable(
                    method_name,
                    call_prefix,
                    p.name,
                    _signature_text(fn, skip_module),
                    example_args,
                )
            )
    if not takes_training:
        for flag in TRAINING_LIKE_FLAGS:
            if flag in names:
                warnings.warn(
                    _errors.training_flag_warning(
                        method_name, call_prefix, flag, example_args
                    ),
                    UserWarning,
                    stacklevel=4,
                )
                break
    return MethodSignature(takes_training=takes_training)


def _example_args(inputs_parameter: Any, rest: Any) -> str:
    """Arguments for the wrapper shown in messages, mapping `training`."""
    args = ["inputs"]
    for p in rest:
        if p.kind in _VARIADIC or p.default is not inspect.Parameter.empty:
            if p.name not in TRAINING_LIKE_FLAGS:
                continue
        value = {
            "deterministic": "not training",
            "use_running_average": "not training",
            "train": "training",
            "is_training": "training",
        }.get(p.name, "...")
        args.append(f"{p.name}={value}")
    if inputs_parameter.kind is inspect.Parameter.VAR_POSITIONAL:
        args[0] = "*inputs"
    return ", ".join(args)


def _signature_text(fn: Callable[..., Any], skip_module: bool) -> str:
    parameters = _parameters(fn, "method")
    if skip_module:
        parameters = parameters[1:]
    return "(" + ", ".join(str(p) for p in parameters) + ")"


def defined_methods(module: Any, base: Any) -> list[str]:
    cls = _class_of(module)
    names = [
        name
        for name in dir(cls)
        if name not in set(dir(base))
        and not name.startswith("_")
        and callable(getattr(cls, name, None))
    ]
    own = [c for c in cls.__mro__ if c not in base.__mro__]
    if any("__call__" in vars(c) for c in own):
        names.insert(0, "__call__")
    return names


def _class_of(module: Any) -> type:
    return module if isinstance(module, type) else type(module)


def resolve_method(
    module: Any, method: Any, base: Any
) -> tuple[Any, MethodSignature]:
    """Checks `method` of a Flax module and tells how to call it.

    Args:
        module: the module instance, or its class (a module constructed
            at build, `FlaxLayer.input_dim()`).
        method: None (`__call__`), a method name, a method of the module,
            or a function whose first argument is the module.
        base: the module base class (`flax.linen.Module` or
            `flax.nnx.Module`).

    Returns:
        `(target, signature)`: `target` is None, a method name or a
        function taking the module first (what `Module.apply` takes as
        `method`); `signature` a `MethodSignature`.
    """
    cls = _class_of(module)
    cls_name = cls.__name__
    # Looked up on the class, a method takes the module first.
    unbound = module is cls
    if method is None:
        fn, target, name, skip = module.__call__, None, "__call__", False
    elif isinstance(method, str):
        if not callable(getattr(cls, method, None)):
            raise ValueError(
                _errors.unknown_method(
                    cls_name, method, defined_methods(module, base)
                )
            )
        fn, target, name, skip = getattr(module, method), method, method, False
    elif inspect.ismethod(method) and isinstance(method.__self__, base):
        fn, name, skip = method, method.__name__, False
        on_class = getattr(cls, name, None) is method.__func__
        target = name if on_class else method.__func__
        unbound = False
    elif callable(method):
        fn, target, skip = method, method, True
        name = getattr(method, "__name__", repr(method))
    else:
        raise TypeError(_errors.bad_method_type(method))
    if skip:
        label, prefix = name, f"{name}(module, "
    else:
        label = f"{cls_name}.{name}"
        prefix = "module(" if name == "__call__" else f"module.{name}("
    return target, method_signature(fn, label, prefix, skip or unbound)


def inputs_fit(inputs: PyTree, specs: Any, layer_name: str) -> None:
    """Raises if `inputs` do not fit the specs the layer was built for."""
    given = jax.tree_util.tree_leaves(inputs)
    built = specs.leaves()
    if len(given) != len(built):
        raise ValueError(
            _errors.inputs_structure_changed(
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
                _errors.inputs_misfit(
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
                _errors.inputs_misfit(
                    layer_name,
                    "dtype",
                    f"{_kind(s.dtype)} ({str(specs)})",
                    f"{_kind(dtype)} ({jnp.dtype(dtype)})",
                )
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
        raise ValueError(_errors.state_without_room(arg, paths))


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
    raise ValueError(
        _errors.state_structure_changed(arg, missing, extra, mismatched)
    )


def linen_variables(
    variables: PyTree, arg: str = "variables"
) -> Mapping[str, Any]:
    if not isinstance(variables, collections.abc.Mapping) or not all(
        isinstance(v, collections.abc.Mapping) for v in variables.values()
    ):
        raise TypeError(_errors.variables_not_mapping(variables, arg))
    bad = non_array_leaves(nn.meta.unbox(variables))
    if bad:
        raise TypeError(_errors.variables_not_arrays(bad, arg))
    return variables


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
            _errors.assignment_misfit(
                layer_name, missing, extra, mismatched, not_arrays
            )
        )


def layer_arguments(cls_name: str, pack_weights: bool) -> None:
    """Refuses a layer on a backend it cannot run on, or a `pack_weights`
    that is not a bool."""
    backend(cls_name)
    if not isinstance(pack_weights, bool):
        raise TypeError(_errors.not_a_bool("pack_weights", pack_weights))


def backend(cls_name: str) -> None:
    """Refuses to construct a layer on a backend it cannot run on."""
    backend = keras.backend.backend()
    if backend not in _backends.SUPPORTED:
        raise ValueError(_errors.unsupported_backend(cls_name, backend))


def packing_allowed() -> None:
    distribution = keras.distribution.distribution()
    if isinstance(distribution, keras.distribution.ModelParallel):
        raise ValueError(_errors.packing_under_model_parallel())


def jax_layer_arguments(
    call_fn: Any, init_fn: Any
) -> tuple[list[str], list[str] | None]:
    """The argument names of `call_fn` and of `init_fn` (None without
    one), checked."""
    call_arguments = function_arguments(call_fn, "call_fn", CALL_FN_ARGUMENTS)
    if init_fn is None:
        return call_arguments, None
    init_arguments = function_arguments(init_fn, "init_fn", INIT_FN_ARGUMENTS)
    return call_arguments, init_arguments


def stateful_result(result: Any) -> tuple[Any, Any]:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ValueError(_errors.stateful_result(result))
    return result[0], result[1]


def nnx_class(module_class: type) -> None:
    """Refuses what is not an NNX module class."""
    if not (
        isinstance(module_class, type) and issubclass(module_class, nnx.Module)
    ):
        raise TypeError(_errors.not_an_nnx_class(module_class))


def nnx_arguments(variables: PyTree, rng_collections: Any) -> None:
    if variables is not None:
        raise ValueError(_errors.nnx_with_variables(variables))
    if rng_collections is not None:
        raise ValueError(_errors.nnx_with_rng_collections(rng_collections))


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
                _errors.variables_misfit(
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
        raise ValueError(_errors.quantize_mode_missing(layer_name))
    if not built:
        raise ValueError(_errors.quantize_unbuilt(layer_name, mode))
    if quantized:
        raise ValueError(_errors.quantize_again(layer_name, mode, policy))
    return mode
