"""Checks of `call_fn` / `init_fn` / `method` signatures."""

import dataclasses
import inspect
import warnings

from keras_flax import _errors

CALL_FN_ARGUMENTS = ("params", "state", "rng", "inputs", "training")
INIT_FN_ARGUMENTS = ("rng", "inputs", "training")
TRAINING_LIKE_FLAGS = (
    "deterministic",
    "train",
    "is_training",
    "use_running_average",
)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _parameters(fn, arg):
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as error:
        raise TypeError(_errors.unsignable(arg, fn)) from error


def function_arguments(fn, arg, allowed):
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


def method_signature(fn, method_name, call_prefix, skip_module):
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


def _example_args(inputs_parameter, rest):
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


def _signature_text(fn, skip_module):
    parameters = _parameters(fn, "method")
    if skip_module:
        parameters = parameters[1:]
    return "(" + ", ".join(str(p) for p in parameters) + ")"


def _defined_methods(module, base):
    names = [
        name
        for name in dir(type(module))
        if name not in set(dir(base))
        and not name.startswith("_")
        and callable(getattr(type(module), name, None))
    ]
    own = [c for c in type(module).__mro__ if c not in base.__mro__]
    if any("__call__" in vars(c) for c in own):
        names.insert(0, "__call__")
    return names


def resolve_method(module, method, base):
    """Checks `method` of a Flax module and tells how to call it.

    Args:
        module: the module instance.
        method: None (`__call__`), a method name, a method of the module,
            or a function whose first argument is the module.
        base: the module base class (`flax.linen.Module` or
            `flax.nnx.Module`).

    Returns:
        `(target, signature)`: `target` is None, a method name or a
        function taking the module first (what `Module.apply` takes as
        `method`); `signature` a `MethodSignature`.
    """
    cls_name = type(module).__name__
    if method is None:
        fn, target, name, skip = module.__call__, None, "__call__", False
    elif isinstance(method, str):
        if not callable(getattr(type(module), method, None)):
            raise ValueError(
                _errors.unknown_method(
                    module, method, _defined_methods(module, base)
                )
            )
        fn, target, name, skip = getattr(module, method), method, method, False
    elif inspect.ismethod(method) and isinstance(method.__self__, base):
        fn, name, skip = method, method.__name__, False
        on_class = getattr(type(module), name, None) is method.__func__
        target = name if on_class else method.__func__
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
    return target, method_signature(fn, label, prefix, skip)
