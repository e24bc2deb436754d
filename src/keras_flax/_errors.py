"""Every user-facing message, written once.

Each message has three parts: the argument and what was expected, what was
received (`Received: arg=...`), and the fix, in code where possible.
"""

import difflib
import functools
import re
import reprlib
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

from flax import nnx

from keras_flax._model import Model
from keras_flax._model import PyTree

T = TypeVar("T")


class UserCodeError(Exception):
    """What the user's model raised, carried out of our code.

    Every call into the user's model (a module's `init` / `apply` / method,
    `call_fn`, `init_fn`) goes through `user_code`, which re-raises what
    it raises as this; our code catches only this (a module refusing a
    size, say), so that our own bugs are never taken for the module's
    refusal. The layer re-raises `error`, the original, to the user.

    Attributes:
        error: the exception the user's code raised.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def user_code(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` (the user's code), raising what it raises as `UserCodeError`."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except UserCodeError:
            raise  # the user's code calling ours calling the user's
        except Exception as error:
            raise UserCodeError(error) from error

    return call


def raises_user_errors(method: Callable[..., T]) -> Callable[..., T]:
    """`method` (a layer's entry point), re-raising to the user the
    original of any `UserCodeError`: the error of their model, as the
    built-in layers raise it."""

    @functools.wraps(method)
    def entry(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except UserCodeError as wrapped:
            raise wrapped.error.with_traceback(
                wrapped.error.__traceback__
            ) from None

    return entry


_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80


def describe(value: Any) -> str:
    """A short description of `value` for a `Received:` clause."""
    kind = type(value).__name__
    if isinstance(value, type):
        kind = "a class"
    elif callable(value) and not hasattr(value, "shape"):
        kind = "a function" if hasattr(value, "__code__") else kind
    return f"{_repr.repr(value)} ({kind})"


def format_shape(shape: Sequence[int | None]) -> str:
    return (
        "("
        + ", ".join(str(d) for d in shape)
        + (",)" if len(shape) == 1 else ")")
    )


# Backends.


def tf_sizes_needed(
    layer_name: str,
    shapes: Sequence[tuple[int | None, ...]],
    error: BaseException,
) -> str:
    shown = ", ".join(format_shape(shape) for shape in shapes)
    return (
        f"Layer '{layer_name}' cannot run on TensorFlow for inputs of unknown "
        f"sizes: its model does not take a symbolic batch size (jax2tf), "
        f"and these inputs have unknown sizes. Received: inputs of shape "
        f"{shown}; at a symbolic batch size the model raised "
        f"{type(error).__name__}: {error}. Give the inputs known sizes (in "
        f"`fit`, `evaluate` and `predict`, a `batch_size` dividing the number "
        f"of samples, or `drop_remainder=True` for a `tf.data` pipeline; "
        f"`keras.Input(shape, batch_size=n)`), or use the JAX backend."
    )


def unsupported_backend(cls_name: str, backend_name: str) -> str:
    return (
        f"`{cls_name}` runs on the JAX, TensorFlow and PyTorch backends. "
        f"Received: KERAS_BACKEND={backend_name!r}. Set one of them before "
        "Keras is imported (`export KERAS_BACKEND=jax`), or import "
        "keras_flax before keras with KERAS_BACKEND unset."
    )


# Function signatures (JaxLayer).


def not_callable(arg: str, value: Any, fix: str) -> str:
    return (
        f"`{arg}` must be a callable. Received: {arg}={describe(value)}. {fix}"
    )


def missing_argument(
    arg: str, fn: Callable[..., Any], name: str, allowed: Any
) -> str:
    return (
        f"`{arg}` must take an argument named `{name}`. Received: "
        f"{arg}={describe(fn)} with arguments {_names(fn)}. The arguments "
        f"are matched by name among {_quoted(allowed)}; wrap the function: "
        f"`def {arg}({', '.join(a for a in allowed)}): ...`."
    )


def unsupported_argument(
    arg: str, fn: Callable[..., Any], name: str, allowed: Any
) -> str:
    return (
        f"`{arg}` has an argument `{name}` that JaxLayer cannot fill."
        f" Received: {arg}={describe(fn)} with arguments {_names(fn)}. "
        f"Arguments are matched by name among {_quoted(allowed)}. Fix: wrap "
        "the function so that it takes only those and gives the others "
        f"inside it: `lambda params, inputs: {arg}(params, inputs, "
        f"{name}=...)` (a `functools.partial` still shows `{name}`)."
    )


def unsignable(arg: str, fn: Callable[..., Any]) -> str:
    return (
        f"`{arg}` must be a function whose signature can be inspected. "
        f"Received: {arg}={describe(fn)}. Wrap it in a plain Python function."
    )


def nothing_to_initialize() -> str:
    return (
        "`init_fn`, `params` and `state` cannot all be `None` when `call_fn` "
        "takes a `params` or a `state` argument. Received: init_fn=None, "
        "params=None, state=None. Pass `init_fn` to create the weights at "
        "build time, or `params=` (and `state=`) with initial values."
    )


# Flax modules and methods.


def not_a_module(module: Any) -> str:
    if isinstance(module, type) and issubclass(module, nnx.Module):
        fix = (
            "To wrap an NNX Module class, instantiate it: "
            f"FlaxLayer({module.__name__}(..., rngs=nnx.Rngs(0)))."
        )
    elif isinstance(module, type):
        fix = (
            "To wrap a Module class, instantiate it: "
            f"FlaxLayer({module.__name__}(...))."
        )
    elif callable(module):
        fix = (
            "To wrap a JAX function use keras_flax.JaxLayer(call_fn=...); "
            "to wrap a Module, pass an instance: FlaxLayer(MyModule())."
        )
    else:
        fix = "Pass a Module instance: FlaxLayer(MyModule())."
    return (
        "`module` must be a flax.linen.Module or flax.nnx.Module instance. "
        f"Received: module={describe(module)}. {fix}"
    )


def bad_method_type(method: Any) -> str:
    return (
        "`method` must be None, a method name (str), a method of the module "
        "or a function whose first argument is the module. Received: "
        f"method={describe(method)}. For example: method='encode' or "
        "method=lambda module, inputs, training: module.encode(inputs)."
    )


def unknown_method(cls_name: str, name: str, available: Any) -> str:
    listed = ", ".join(f"'{n}'" for n in available) or "none"
    return (
        f"`method` names no method of {cls_name}. Received: "
        f"method={name!r}. Methods defined on the module: {listed}. Pass one "
        "of them, or a function `method(module, inputs, training)`."
    )


_WRAPPER = (
    "def wrapper(module, inputs, training):\n"
    "        return {call}\n"
    "    FlaxLayer(module, method=wrapper)"
)


def wrapper_example(call_prefix: str, call_args: Any) -> str:
    """Example code mapping FlaxLayer's call onto the user's method.

    `call_prefix` is how the method is called: "module(", "module.encode("
    or "my_fn(module, ".
    """
    return _WRAPPER.format(call=f"{call_prefix}{call_args})")


def method_without_inputs(method_name: str, call_prefix: str) -> str:
    return (
        f"`method` must take the inputs as its first argument after the "
        f"module. Received: method={method_name} with no such argument. "
        "Give it one (`def __call__(self, inputs, training=False)`), or wrap "
        "it:\n    " + wrapper_example(call_prefix, "")
    )


def method_unfillable(
    method_name: str,
    call_prefix: str,
    parameter: Any,
    signature: Any,
    example_args: Any,
) -> str:
    return (
        f"`method` has a required argument `{parameter}` that FlaxLayer "
        f"cannot fill: it passes the inputs as the first argument and "
        f"`training` by name. Received: method={method_name}{signature}. "
        "Give the argument a default, or wrap the method:\n    "
        + wrapper_example(call_prefix, example_args)
    )


def training_flag_warning(
    method_name: str, call_prefix: str, flag: Any, example_args: Any
) -> str:
    return (
        f"`method` {method_name} has a `{flag}` flag but no `training` "
        "argument, so FlaxLayer will not switch it in `fit`: the module "
        f"runs with the default `{flag}` in training too. Map `training` "
        "onto it with a wrapper:\n    "
        + wrapper_example(call_prefix, example_args)
    )


# Variables.


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


def variables_without_params(collections: Any) -> str:
    return (
        "`variables` has no 'params' collection, but the module creates "
        f"parameters. Received: variables with collections {collections}. "
        "Pass the whole result of `module.init(...)`, e.g. "
        "`variables={'params': params, **state}`."
    )


def _difference(given: Any, expected: Any) -> tuple[str, str]:
    if isinstance(given, tuple):
        return f"shape {format_shape(given)}", format_shape(expected)
    return f"dtype {given}", str(expected)


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
        lines.append("Missing: " + ", ".join(missing[:8]) + _more(missing, 8))
    lines.append(fix)
    return " ".join(lines)


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
        lines.append("Missing: " + ", ".join(missing[:8]) + _more(missing, 8))
    if extra:
        lines.append("Unexpected: " + ", ".join(extra[:8]) + _more(extra, 8))
    lines.append(
        "Return the state with the same keys and shapes as it was given "
        "(`return outputs, new_state`); keep values that change shape, such "
        "as growing caches, outside the state."
    )
    return " ".join(lines)


def state_without_room(arg: str, paths: Sequence[str]) -> str:
    listed = ", ".join(paths[:8]) + _more(paths, 8)
    return (
        f"`{arg}` returned a new state, but the layer holds no state to "
        "keep it in (it was given `state=None`, or `init_fn` returned no "
        f"state). Received: a new state with leaves {listed}. Give the "
        "layer its initial state (`state=...`, or `init_fn` returning "
        "`(params, state)`), or return `(outputs, state)` with the state "
        "unchanged."
    )


# NNX.


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


def lazy_build_failed(cls_name: str, spec: Any, error: Any) -> str:
    return (
        f"`module` {cls_name} creates its variables when first called, and "
        "that call failed when the layer was built. The module raised: "
        f"{type(error).__name__}: {error}. Received: inputs {spec}. Call "
        "the layer on inputs of the shape the module is "
        "written for (`keras.Input(shape=...)`), or build the module "
        "yourself first (`nnx.bridge.lazy_init(module, x)`)."
    )


def input_dim_axis(axis: Any) -> str:
    return (
        "`FlaxLayer.input_dim(axis)` takes a non-batch axis of the input, an "
        "int other than 0 (the batch axis, whose size is unknown at build; "
        f"-1 is the last). Received: axis={axis!r}. Give the axis whose "
        "size the argument takes, e.g. `FlaxLayer.input_dim(-1)`."
    )


def input_dim_in_module(cls_name: str, field: str) -> str:
    return (
        f"`module` {cls_name} holds `FlaxLayer.input_dim()` in its field "
        f"`{field}`, which only `FlaxLayer.from_nnx` fills. Received: a "
        "module constructed with it. A linen module takes its input sizes "
        "from its inputs already: leave the size out; for an NNX module "
        "class, use `FlaxLayer.from_nnx(module_class, FlaxLayer.input_dim(), "
        "...)`."
    )


def input_dim_in_layer_kwargs(keys: Any) -> str:
    return (
        "`layer_kwargs` are the layer's own arguments, which no input size "
        f"fills. Received: `FlaxLayer.input_dim()` in layer_kwargs {keys}. "
        "Give it among the module's constructor arguments (`*args` and "
        "`**kwargs` of `from_nnx`)."
    )


def input_dim_not_one_input(layer_name: str, spec: Any) -> str:
    return (
        f"Layer '{layer_name}' fills `FlaxLayer.input_dim()` from its input, "
        f"which must be one array. Received: inputs {spec}. Call the layer "
        "on one array, or give the module its sizes explicitly."
    )


def input_dim_out_of_range(layer_name: str, axis: int, spec: Any) -> str:
    return (
        f"Layer '{layer_name}' fills `FlaxLayer.input_dim({axis})` from axis "
        f"{axis} of its input, which has no such non-batch axis. Received: "
        f"inputs {spec}. Give an axis of the input other than the batch "
        "axis (-1 is the last)."
    )


def input_dim_unknown(layer_name: str, axis: int, spec: Any) -> str:
    return (
        f"Layer '{layer_name}' fills `FlaxLayer.input_dim({axis})` from axis "
        f"{axis} of its input, whose size is unknown. Received: inputs "
        f"{spec}. Give that size in `keras.Input(shape=...)`."
    )


def stacked_streams_without_policy(paths: Sequence[str]) -> str:
    listed = ", ".join(paths[:6]) + _more(paths, 6)
    return (
        "`seed` reseeds every RNG stream of the NNX module, but this Flax "
        "version's `nnx.reseed` cannot reseed stacked streams (one key per "
        "slice, made by `nnx.split_rngs`). Received: seed with stacked "
        f"streams at {listed}. Leave `seed` out and seed the module where "
        "you build it (`nnx.Rngs(seed)`), or upgrade Flax."
    )


# Equinox.


def equinox_missing(error: BaseException) -> str:
    return (
        "`EquinoxLayer` needs the `equinox` package (the `equinox` extra). "
        f"Received: `import equinox` failed ({error}). Fix: "
        '`pip install "keras-flax[equinox]"` (or `pip install equinox`).'
    )


def not_an_equinox_module(module: Any) -> str:
    fix = "Pass an `equinox.Module` instance."
    if isinstance(module, type):
        fix = (
            f"To wrap an Equinox Module class, instantiate it, or let the "
            f"layer do it: EquinoxLayer.from_constructor({module.__name__}, "
            "..., key=jax.random.key(0))."
        )
    return (
        "`module` of EquinoxLayer must be an equinox.Module instance. "
        f"Received: module={describe(module)}. {fix}"
    )


def equinox_state_missing(label: str) -> str:
    return (
        f"The method of {label} takes `state` (a stateful module: "
        "BatchNorm, SpectralNorm), so the layer needs the `eqx.nn.State` "
        "made beside the module. Received: state=None. Fix: "
        f"`module, state = eqx.nn.make_with_state({label})(...)`, then "
        "`EquinoxLayer(module, state=state)`, or "
        f"`EquinoxLayer.from_constructor({label}, ...)`."
    )


def equinox_method_without_inputs(fn: Callable[..., Any]) -> str:
    return (
        "`method` must take the module and then the inputs: "
        "`(module, x, *, key=None)` or `(module, x, state, *, key=None)`. "
        f"Received: method={describe(fn)}, which takes {_names(fn)}. Fix: "
        "`def method(module, x): return module(x)`."
    )


def equinox_not_serializable(module: Any) -> str:
    name = type(module).__name__
    return (
        "An EquinoxLayer can be saved in a `.keras` file when it was made "
        "with `EquinoxLayer.from_constructor(cls, *args, **kwargs)`, which "
        f"records the constructor call. Received: module={name}, built "
        f"outside the layer. Fix: EquinoxLayer.from_constructor({name}, "
        "..., key=jax.random.key(0)); `model.save_weights(...)` works in any "
        "case."
    )


def not_an_equinox_class(module_class: type) -> str:
    return (
        "`module_class` of EquinoxLayer.from_constructor must be an "
        f"equinox.Module class. Received: module_class={describe(module_class)}"
        ". Fix: pass the class and its constructor arguments: "
        "`EquinoxLayer.from_constructor(MLP, 4, 2, key=jax.random.key(0))`."
    )


def nnx_not_serializable(module: Any) -> str:
    name = type(module).__name__
    return (
        "A FlaxLayer wrapping an NNX module can be saved when the module "
        "class defines `get_config()` / `from_config()`, or when the layer "
        "was made with `FlaxLayer.from_nnx(cls, *args, **kwargs)`, which "
        f"records the constructor call. Received: module={name}, with "
        f"neither. Build the layer with FlaxLayer.from_nnx({name}, ..., "
        f"rngs=nnx.Rngs(0)), or define get_config/from_config on {name}; "
        "`model.save_weights(...)` works in any case."
    )


def not_an_nnx_class(module_class: type) -> str:
    return (
        "`module_class` of FlaxLayer.from_nnx must be a flax.nnx.Module "
        f"class. Received: module_class={describe(module_class)}. Pass the "
        "class and its constructor arguments: "
        "FlaxLayer.from_nnx(MLP, 784, 10, rngs=nnx.Rngs(0))."
    )


# Build and call.


def stateful_result(result: Any) -> str:
    return (
        "`call_fn` takes `state`, so it must return `(outputs, new_state)`. "
        f"Received: a {type(result).__name__} from call_fn. Return the new "
        "state with the outputs: `return outputs, new_state`."
    )


def cannot_initialize(
    arg: str, input_desc: str, tried: Any, error: BaseException | None
) -> str:
    return (
        f"`{arg}` failed on placeholder inputs {input_desc} while building "
        f"the layer (unknown dimensions tried with sizes {tried}). The "
        f"module raised: {type(error).__name__}: {error}. Give the input "
        "shape in full, e.g. `keras.Input(shape=(28, 28, 3))`, or pass "
        "initial weights (`variables=module.init(rng, x)`)."
    )


def output_shape_unknown(
    layer_name: str, unknown: Any, tried: Any, error: BaseException
) -> str:
    where = ", ".join(
        f"dimension {axis}" if i == 0 else f"input {i} dimension {axis}"
        for i, axis in unknown[:6]
    ) + _more(unknown, 6)
    return (
        f"Layer '{layer_name}' cannot compute its output shape: the module "
        "takes neither symbolic sizes nor any of the sizes tried "
        f"{tried} for the unknown input sizes ({where}). The module raised: "
        f"{type(error).__name__}: {error}. Received: `inputs` with those "
        "sizes unknown. Give them in full, e.g. "
        "`keras.Input(shape=(32, 32, 3))` instead of (None, None, 3)."
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


# Composition helpers.


def bad_compose_object(helper: Any, obj: Any) -> str:
    return (
        f"`object` of {helper}() must be a keras.Sequential model, a Keras "
        "tensor (e.g. keras.Input(...)), an array, or None. Received: "
        f"object={describe(obj)}. Pass one of those, or call the layer "
        f"yourself: `layer = {helper}(module=...)`."
    )


def _names(fn: Callable[..., Any]) -> str:
    import inspect

    try:
        return "(" + ", ".join(inspect.signature(fn).parameters) + ")"
    except (TypeError, ValueError):
        return "(unknown)"


def _quoted(names: Any) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _more(items: Any, shown: Any) -> str:
    return f" (and {len(items) - shown} more)" if len(items) > shown else ""


# Packed weights.


def not_a_bool(arg: str, value: Any) -> str:
    return (
        f"`{arg}` must be True or False. Received: {arg}={describe(value)}. "
        f"Pass {arg}=True or {arg}=False."
    )


def packing_under_model_parallel() -> str:
    return (
        "`pack_weights=True` keeps each dtype's leaves in one replicated "
        "variable, so a `keras.distribution.ModelParallel` layout cannot "
        "shard them. Received: pack_weights=True under ModelParallel. Pass "
        "pack_weights=False (the default) to shard weights by their Flax "
        "paths, or use DataParallel."
    )


def weights_count_mismatch(
    layer_name: str, expected: Any, received: Any
) -> str:
    return (
        f"The weights file for layer '{layer_name}' must hold one array per "
        f"leaf of the model: {expected}. Received: {received} arrays. Load "
        "a file saved from a layer wrapping the same model (packed or not)."
    )


# Saving and loading configs.


def unserializable(path: str, value: Any) -> str:
    return (
        f"`{path}` cannot be saved: it is "
        f"{value!r} ({type(value).__name__}), which has no import path. "
        "Make the value importable (a function or class defined at the top "
        "level of a module, or `functools.partial` of one). For a module "
        "field, you can instead define `get_config()` on the module class "
        "(and `from_config` if its constructor does not take that dict)."
    )


def unknown_config_kind(path: str, kind: Any, config: dict[str, Any]) -> str:
    return (
        f"The saved config of `{path}` has an entry of unknown kind "
        f"{kind!r}. Received: {config!r}. The file was saved by another "
        "version of keras-flax, or altered; load it with the version that "
        "saved it."
    )


def onnx_unconvertible(layer_name: str, primitives: Any) -> str:
    return (
        f"Layer '{layer_name}' cannot be exported to ONNX: jax2onnx has no "
        f"conversion for the JAX operation(s) {_quoted(primitives)} that "
        f"its module runs in inference. Received: operations="
        f"{list(primitives)}. Fix: keep the operation out of the inference "
        "path (for example `jax.debug.print` or `jax.pure_callback`, which "
        "no exported artifact can hold), replace it by operations jax2onnx "
        "converts, or register a conversion with "
        "`jax2onnx.plugins.plugin_system.register_primitive`."
    )


def onnx_nested_jit(layer_name: str, jax2onnx: str, jax: str) -> str:
    return (
        f"Layer '{layer_name}' cannot be exported to ONNX with jax2onnx "
        f"{jax2onnx} on JAX {jax}: its module calls a function with a custom "
        "derivative that calls a jitted one (on JAX 0.12, `jax.nn.relu` and "
        "other activations a module keeps as a field, as Equinox's `MLP` "
        "does), which this jax2onnx cannot lower on this JAX. Received: "
        f"jax2onnx=={jax2onnx}, jax=={jax}. Nothing was written. Export "
        "StableHLO instead (`keras_flax.export_stablehlo(model, path)`), "
        "or export to ONNX on Python 3.11 (JAX 0.10), or with a jax2onnx "
        "release that supports this JAX."
    )


def onnx_quantized(layer_name: str, mode: str) -> str:
    return (
        f"Layer '{layer_name}' cannot be exported to ONNX once quantized "
        f"(mode {mode!r}): its module runs Qwix's quantized `dot_general` "
        "(integer weights with their scales, in Qwix's quantized kernel "
        "objects), which jax2onnx does not convert: its Flax `Dense` / "
        "`Linear` conversions take float kernels only, and an integer dot "
        "becomes an ONNX `Gemm` that ONNX refuses. Nothing was written. "
        "Export the quantized model as StableHLO "
        "(`keras_flax.export_stablehlo(model, path)`, which keeps the integer "
        "weights), or export the float model to ONNX and quantize the file "
        "with ONNX Runtime's tools (`onnxruntime.quantization`)."
    )


def export_backend(backend_name: str) -> str:
    return (
        "`export_stablehlo` writes `jax.export` artifacts, on the JAX "
        f"backend only. Received: backend={backend_name!r}. Fix: set "
        "`KERAS_BACKEND=jax` before importing Keras, or on this backend use "
        '`model.export(path, format="tf_saved_model")`.'
    )


def export_without_signature(model: Model) -> str:
    return (
        "`export_stablehlo` needs `input_signature` for a model without "
        f"`model.input`. Received: model={describe(model)}, "
        "input_signature=None. Fix: pass the inputs' specs, e.g. "
        "`input_signature=keras.InputSpec(shape=(None, 5))` (None: any "
        "size), or "
        "build the model as a functional or `Sequential` model with "
        "`keras.Input`."
    )


def bad_input_signature(input_signature: Any) -> str:
    return (
        "`input_signature` must be a structure of `keras.InputSpec`, "
        "`jax.ShapeDtypeStruct` or Keras tensors, as the model takes its "
        f"inputs. Received: input_signature={describe(input_signature)}. "
        "Fix: e.g. `input_signature=keras.InputSpec(shape=(None, 5))` for "
        "one input of 5 features, any batch size."
    )


# OptaxOptimizer.


def optax_backend(backend_name: str) -> str:
    return (
        "`OptaxOptimizer` runs Optax, on the JAX backend only. Received: "
        f"backend={backend_name!r}. Fix: set `KERAS_BACKEND=jax` before "
        "importing Keras, or use a Keras optimizer (`keras.optimizers.Adam`)."
    )


def optax_transformation(value: Any) -> str:
    return (
        "`transformation` must be an `optax.GradientTransformation` or a "
        "function returning one. Received: transformation="
        f"{describe(value)}. Fix: e.g. `OptaxOptimizer(optax.adam(1e-3))` or "
        "`OptaxOptimizer(optax.adam, learning_rate=1e-3)`."
    )


def optax_factory_result(factory: Any, result: Any) -> str:
    return (
        "`transformation`, called with the given keyword arguments, must "
        "return an `optax.GradientTransformation`. Received: "
        f"transformation={describe(factory)}, which returned "
        f"{describe(result)}. Fix: pass the factory of a transformation "
        "(`optax.adamw`) or your function that returns `optax.chain(...)`."
    )


def optax_kwargs_with_transformation(names: Any) -> str:
    return (
        "Keyword arguments go to a factory; a ready transformation takes "
        f"none. Received: an `optax.GradientTransformation` and {names}. "
        "Fix: pass the factory and its arguments, "
        "`OptaxOptimizer(optax.adamw, learning_rate=1e-3)`, or the "
        "transformation alone, `OptaxOptimizer(optax.adamw(1e-3))`."
    )


def optax_duplicate_paths(paths: Sequence[str]) -> str:
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    return (
        "`OptaxOptimizer` keys parameters by their Keras variable paths, "
        f"which must be unique. Received: paths {repeated} more than once. "
        "Fix: give the layers holding them distinct names."
    )


def optax_learning_rate_set(value: Any) -> str:
    return (
        "The learning rate of an `OptaxOptimizer` is Optax's: Keras cannot "
        f"set it. Received: learning_rate={describe(value)} (e.g. from "
        "`keras.callbacks.LearningRateScheduler`). Fix: give the schedule "
        "to Optax, `OptaxOptimizer(optax.inject_hyperparams(optax.adam)("
        "learning_rate=optax.cosine_decay_schedule(1e-3, 1000)))`, and drop "
        "the callback."
    )


def optax_not_serializable(transformation: Any) -> str:
    return (
        "An `OptaxOptimizer` made from a ready transformation cannot be "
        "saved in a model file. Received: transformation="
        f"{type(transformation).__name__}(...), which has no import path. "
        "Fix: pass an importable factory and JSON-able arguments, "
        "`OptaxOptimizer(optax.adamw, learning_rate=1e-3)` (or your own "
        "top-level function building the chain); `model.save_weights(...)` "
        "works in any case."
    )


# Fine-tuning: `wrt` and assigned variables.

_WRT_FIX = (
    "Pass an NNX filter: a Variable type (`wrt=nnx.LoRAParam`), "
    "`nnx.PathContains('head')`, `nnx.Any(...)` / `nnx.All(...)` / "
    "`nnx.Not(...)`, a string (a tag), or a function `(path, value) -> "
    "bool`; or wrt=None to train every parameter."
)


def wrt_not_a_filter(wrt: Any) -> str:
    return (
        "`wrt` must be a Flax NNX filter choosing the parameters that train. "
        f"Received: wrt={describe(wrt)}. {_WRT_FIX}"
    )


def wrt_unsupported(wrt: Any, label: str) -> str:
    return (
        f"`wrt` chooses among the parameters of a model that names them; "
        f"{label} gives its weights as one tree. Received: "
        f"wrt={describe(wrt)}. Fix: split the trainable weights from the "
        "rest yourself (`params` and `state`), or pass `trainable=False` to "
        "train none."
    )


def wrt_bad_function(wrt: Any, fn: Callable[..., Any]) -> str:
    part = "" if fn is wrt else f", holding {describe(fn)},"
    return (
        "`wrt` functions are called as `fn(path, value)` and return whether "
        f"the parameter trains. Received: wrt={describe(wrt)}{part} which "
        f"takes {_names(fn)}. Fix: "
        "`def trains(path, value): return 'head' in path`."
    )


def wrt_typed_for_linen(wrt: Any, typed: Any) -> str:
    listed = ", ".join(repr(p) for p in typed[:4]) + _more(typed, 4)
    return (
        "`wrt` chooses linen parameters by their path inside `params`; they "
        "have no Variable type or tag to filter on. Received: "
        f"wrt={describe(wrt)}, which tests {listed}. Fix: filter on paths, "
        "e.g. `wrt=nnx.PathContains('head')` or "
        "`wrt=nnx.Not(nnx.PathContains('backbone'))`, or pass a function "
        "`(path, value) -> bool`."
    )


def wrt_selects_nothing(wrt: Any, label: str, candidates: Any) -> str:
    listed = ", ".join(candidates[:8]) + _more(candidates, 8)
    return (
        f"`wrt` selects none of the parameters of {label}, so nothing would "
        f"train. Received: wrt={describe(wrt)}; the parameters are: "
        f"{listed}. Fix: pass a filter matching some of them, or wrt=None "
        "to train every parameter (or `trainable=False` to train none)."
    )


def wrt_not_serializable(wrt: Any, part: Any) -> str:
    return (
        "`wrt` cannot be saved in a model config: the filter "
        f"{describe(part)} has no import path. Received: wrt={describe(wrt)}. "
        "Fix: define the function at the top level of a module (or register "
        "it with `keras.saving.register_keras_serializable`), or use NNX's "
        "filters (a Variable type, `nnx.PathContains(...)`, `nnx.Any(...)`); "
        "`model.save_weights(...)` works in any case."
    )


def wrt_set(layer_name: str, wrt: Any) -> str:
    return (
        f"`wrt` of layer '{layer_name}' is fixed when the layer is made: its "
        "weights are trainable or not from then on. Received: "
        f"layer.wrt = {describe(wrt)}. Fix: make a new layer, "
        "`FlaxLayer(module, wrt=...)`, and copy the values into it once "
        "built: `new.flax_variables = layer.flax_variables`."
    )


def assigned_before_build(layer_name: str) -> str:
    return (
        f"`flax_variables` of layer '{layer_name}' cannot be assigned before "
        "its weights exist. Received: an assignment to a layer not yet "
        "built. Call the layer on inputs first (or `model.build(...)`), or "
        "pass the variables at construction: `FlaxLayer(module, "
        "variables=...)`."
    )


def nnx_variables_not_state(variables: PyTree) -> str:
    return (
        "`flax_variables` of an NNX layer takes an `nnx.State` (as "
        "`nnx.state(model)` returns) or a pure dict (as `nnx.to_pure_dict` "
        f"returns). Received: flax_variables={describe(variables)}. Fix: "
        "`layer.flax_variables = nnx.state(model)`."
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
        listed = ", ".join(missing[:8]) + _more(missing, 8)
        lines.append(f"Missing: {listed}.")
    if extra:
        listed = ", ".join(extra[:8]) + _more(extra, 8)
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


# Safetensors checkpoints.

_RULES_FORM = (
    "Each rule is (regex, replacement) or (regex, replacement, transforms), "
    'e.g. (r"layers\\.(\\d+)\\.weight", r"blocks/\\1/kernel", '
    '{"transpose": (1, 0)}), with transforms from "transpose", "reshape", '
    '"dtype"; or the string "torch" for PyTorch\'s conventions.'
)


def checkpoint_unbuilt(function: str, layer_name: str) -> str:
    return (
        f"`{function}` needs a built layer: layer {layer_name!r} holds no "
        f"weights yet. Received: layer={layer_name!r} (not built). Call it "
        "on a batch first (`layer(x)`, or `model.build(input_shape)` / "
        "`keras.Input` for the model holding it)."
    )


def checkpoint_not_found(filepath: str) -> str:
    return (
        "`filepath` must be a safetensors file or a sharded checkpoint's "
        f"`*.safetensors.index.json`. Received: filepath={filepath!r}, "
        "which does not exist. Check the path (a Hugging Face folder holds "
        "`model.safetensors` or `model.safetensors.index.json`)."
    )


def checkpoint_not_safetensors(filepath: str, error: BaseException) -> str:
    return (
        f"`filepath` must be a safetensors file. Received: "
        f"filepath={filepath!r}, which safetensors cannot read ({error}). "
        "Pass a `.safetensors` file or a `*.safetensors.index.json`; a "
        "PyTorch `.bin`/`.pt` file can be converted with `torch.load` and "
        "`safetensors.torch.save_file`."
    )


def checkpoint_bad_index(filepath: str, error: BaseException) -> str:
    return (
        "`filepath` names a sharded checkpoint's index, which must be JSON "
        f'with a "weight_map" of key -> file. Received: filepath='
        f"{filepath!r} ({type(error).__name__}: {error}). Pass the "
        "`*.safetensors.index.json` written with the shards."
    )


def checkpoint_missing_shard(filepath: str, shard: Any) -> str:
    return (
        f"`filepath` is a sharded checkpoint's index naming the file "
        f"{shard!r}, which is not beside it. Received: filepath="
        f"{filepath!r}. Download or copy every shard the index names into "
        "its folder."
    )


def rules_not_a_list(rules: Any) -> str:
    return (
        '`rules` must be None, "torch" or a list of rules. Received: '
        f"rules={describe(rules)}. {_RULES_FORM}"
    )


def bad_rule(index: Any, rule: Any, what: str) -> str:
    return (
        f"`rules[{index}]` is not a rule: {what} does not fit. Received: "
        f"rules[{index}]={_repr.repr(rule)}. {_RULES_FORM}"
    )


def bad_transform(
    key: Any, shape: Sequence[int | None], kind: Any, argument: Any
) -> str:
    what = (
        "a permutation of its axes"
        if kind == "transpose"
        else "a shape of the same element count"
    )
    return (
        f"The rule placing key {key!r} (shape {format_shape(shape)}) asks "
        f"for {{{kind!r}: {argument!r}}}, which must be {what}. Received: "
        f"{kind}={argument!r}. Fix the rule's transforms for this key (a "
        "rule matching tensors of several ranks needs one rule per rank)."
    )


def checkpoint_duplicate(arg: str, first: Any, second: Any) -> str:
    return (
        f"`{arg}`: two tensors land on one place, {first!r} and "
        f"{second!r}. Received: both placed at the same name. Make the "
        "rules place each key on a weight of its own."
    )


def checkpoint_keys(
    layer_name: str, missing: Sequence[str], unexpected: Any
) -> str:
    lines = [
        f"`filepath` does not hold exactly the weights of layer "
        f"{layer_name!r} (strict=True)."
    ]
    if missing:
        lines.append(f"Missing weights ({len(missing)}): {', '.join(missing)}.")
    if unexpected:
        lines.append(
            f"Keys placed on no weight ({len(unexpected)}): "
            f"{', '.join(unexpected)}."
        )
    lines.append(
        "Add `rules` renaming the keys to the layer's weight names "
        "(`[w.path for w in layer.weights]` without the layer name), use "
        'rules="torch" for a PyTorch checkpoint, or pass strict=False to '
        "read what fits and get the rest reported."
    )
    return " ".join(lines)


def checkpoint_misfit(misfits: Any) -> str:
    rows = "; ".join(
        f"key {key!r} -> {name}: checkpoint {format_shape(shape)} {dtype}, "
        f"layer {format_shape(held_shape)} {held_dtype}"
        for key, name, shape, dtype, held_shape, held_dtype in misfits
    )
    return (
        "`filepath` holds tensors that do not fit the weights they are "
        f"placed on (shape, or dtype kind): {rows}. Nothing was written. "
        'Give the rule a transform ({"transpose": axes}, {"reshape": '
        'shape}, {"dtype": name}), or check that the layer was built for '
        "the checkpoint's sizes."
    )


def safetensors_missing() -> str:
    return (
        "Reading and writing safetensors checkpoints needs the `safetensors` "
        "package, which is not installed. Install it: "
        '`pip install "keras-flax[safetensors]"` (or `pip install '
        "safetensors`)."
    )


# Distribution.


def layout_key_unmatched(
    key: Any, layer_name: str, paths: Sequence[str]
) -> str:
    names = [path.split("/", 1)[-1] for path in paths]
    literal = "/".join(re.findall(r"[\w-]+", key))
    closest = difflib.get_close_matches(literal, names, n=1, cutoff=0) or names
    shown = ", ".join(repr(p) for p in paths[:4])
    more = ", ..." if len(paths) > 4 else ""
    return (
        f"LayoutMap key {key!r} matches no weight of layer {layer_name!r}, "
        "so it lays out nothing. Keras matches each key against a weight's "
        f"whole path (`re.fullmatch`); this layer's are {shown}{more}. "
        f"Write the whole path or a pattern such as '.*/{closest[0]}'."
    )


# Quantization.


def qwix_missing() -> str:
    return (
        "Quantizing a Flax layer (`model.quantize`, `layer.quantize`) needs "
        "the `qwix` package, which is not installed. Install it: "
        '`pip install "keras-flax[quantize]"` (or `pip install qwix`).'
    )


def qwix_argument(names: list[str], qwix: str, jax: str) -> str:
    return (
        "The quantized module calls `jax.lax.dot_general` with "
        f"{', '.join(f'`{n}`' for n in names)} set, which Qwix {qwix} cannot "
        f"take (JAX {jax} has it). Received: {', '.join(names)} not None. "
        "Leave it unset in the module's call, or quantize with a Qwix "
        "release that takes it."
    )


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


def quantize_backend(layer_name: str, backend_name: str) -> str:
    return (
        f"Layer '{layer_name}' is quantized on the JAX backend only (Qwix "
        f"rewrites the module's JAX operations). Received: "
        f"KERAS_BACKEND={backend_name!r}. Quantize (and load a quantized "
        "model) with `KERAS_BACKEND=jax`; to serve elsewhere, export the "
        "quantized model (`export_stablehlo`, ONNX)."
    )


def quantize_kind_not_implemented(layer_name: str, label: str) -> str:
    return (
        f"Layer '{layer_name}' ({label}) does not implement quantization: "
        "only Flax modules (linen and NNX, in `FlaxLayer`) are quantized, "
        "through Qwix. It stays float. To quantize it, wrap it as a Flax "
        "module, or apply Qwix to your functions yourself."
    )


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


def quantize_refused(
    layer_name: str, label: str, mode: str, error: BaseException
) -> str:
    return (
        f"Layer '{layer_name}' ({label}) cannot be quantized in mode "
        f"{mode!r}: Qwix refused the module: {type(error).__name__}: "
        f"{error}. Nothing was changed. Quantize in another mode, or leave "
        "the layer out with `model.quantize(..., filters=...)`."
    )


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


def nothing_to_quantize(
    layer_name: str, label: str, mode: str, ops: Sequence[str]
) -> str:
    return (
        f"Layer '{layer_name}' ({label}) has nothing to quantize in mode "
        f"{mode!r}: Qwix quantizes the weights of its {_quoted(ops)} "
        "operations (`nn.Dense`, `nnx.Linear`, `nn.Einsum`, ...), and the "
        "module runs none on a weight (convolutions and embeddings stay "
        "float, as in Keras' own layers). It stays float."
    )
