"""The signatures of what the user gives: the arguments of `call_fn` and
`init_fn` (matched by name, as `keras.layers.JaxLayer` matches them), and
the method of a module (its inputs, `training`, and what the layer fills).
"""

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from keras_flax import _errors
from keras_flax._errors import describe
from keras_flax._errors import names
from keras_flax._errors import quoted

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
        raise TypeError(unsignable(arg, fn)) from error


def unsignable(arg: str, fn: Callable[..., Any]) -> str:
    return (
        f"`{arg}` must be a function whose signature can be inspected. "
        f"Received: {arg}={describe(fn)}. Wrap it in a plain Python function."
    )


def function_arguments(
    fn: Callable[..., Any], arg: str, allowed: Any
) -> list[str]:
    """The argument names of `fn` (`call_fn` or `init_fn`), in order.

    Arguments are matched by name, as `keras.layers.JaxLayer` does: each
    must be one of `allowed`, and `inputs` is required.
    """
    if not callable(fn):
        raise TypeError(not_callable(arg, fn, f"Pass a function `{arg}(...)`."))
    names = [p.name for p in _parameters(fn, arg)]
    for name in names:
        if name not in allowed:
            raise ValueError(unsupported_argument(arg, fn, name, allowed))
    if "inputs" not in names:
        raise ValueError(missing_argument(arg, fn, "inputs", allowed))
    return names


def not_callable(arg: str, value: Any, fix: str) -> str:
    return (
        f"`{arg}` must be a callable. Received: {arg}={describe(value)}. {fix}"
    )


def missing_argument(
    arg: str, fn: Callable[..., Any], name: str, allowed: Any
) -> str:
    return (
        f"`{arg}` must take an argument named `{name}`. Received: "
        f"{arg}={describe(fn)} with arguments {names(fn)}. The arguments "
        f"are matched by name among {quoted(allowed)}; wrap the function: "
        f"`def {arg}({', '.join(a for a in allowed)}): ...`."
    )


def unsupported_argument(
    arg: str, fn: Callable[..., Any], name: str, allowed: Any
) -> str:
    return (
        f"`{arg}` has an argument `{name}` that JaxLayer cannot fill."
        f" Received: {arg}={describe(fn)} with arguments {names(fn)}. "
        f"Arguments are matched by name among {quoted(allowed)}. Fix: wrap "
        "the function so that it takes only those and gives the others "
        f"inside it: `lambda params, inputs: {arg}(params, inputs, "
        f"{name}=...)` (a `functools.partial` still shows `{name}`)."
    )


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
        raise ValueError(method_without_inputs(method_name, call_prefix))
    rest = [p for p in parameters if p is not positional[0]]
    names = {p.name for p in rest}
    takes_training = "training" in names
    example_args = _example_args(positional[0], rest)
    for p in rest:
        if p.name == "training" or p.kind in _VARIADIC:
            continue
        if p.default is inspect.Parameter.empty:
            raise ValueError(
                method_unfillable(
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
                    training_flag_warning(
                        method_name, call_prefix, flag, example_args
                    ),
                    UserWarning,
                    stacklevel=4,
                )
                break
    return MethodSignature(takes_training=takes_training)


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
