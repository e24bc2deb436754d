"""A Flax linen module and its forward method as a `Model`.

`init` is `Module.init`, its output split into `params` (the `params`
collection, kept under its key as `keras.layers.FlaxLayer` keeps it),
`state` (every other collection but what modules `sow`) and the mesh axes
of boxed (partitioned) variables; `apply` is `Module.apply` with the
state's collections mutable, so what a module sows is dropped.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.core
import flax.errors
import flax.linen as nn
import jax

from keras_flax import _checks
from keras_flax import _fast_init
from keras_flax import _quantize
from keras_flax import _rng
from keras_flax import _serialization
from keras_flax import _sizes
from keras_flax import _summary
from keras_flax import _user_code
from keras_flax import _variables
from keras_flax._model import Diagnostics
from keras_flax._model import FineTuning
from keras_flax._model import Model
from keras_flax._model import PyTree
from keras_flax._model import Quantization
from keras_flax._model import Rng
from keras_flax._model import Structure
from keras_flax._model import UserFormat

# Collections never held as state: what modules `sow`.
_NEVER_STATE = ("params", "intermediates")


@dataclasses.dataclass(frozen=True)
class _Wrapped:
    """What the functions of an adapted linen module work on.

    Attributes:
        module: the `flax.linen.Module`.
        method: None, a method name, or a function taking the module first.
        takes_training: whether the method takes `training`.
        rngs: the RNG streams fed to `apply`.
        rules: the logical axis rules in force when the layer was made, for
            boxes without rules of their own split outside any rules scope.
    """

    module: Any
    method: Any
    takes_training: bool
    rngs: tuple[str, ...]
    rules: tuple[Any, ...]

    def kwargs(self, training: bool) -> dict[str, bool]:
        return {"training": training} if self.takes_training else {}


def adapt(
    module: Any,
    method: Any,
    takes_training: bool,
    *,
    variables: PyTree,
    rng_collections: Any,
    seed: Any,
) -> Model:
    """The `Model` of a linen module.

    Args:
        module: the `flax.linen.Module` instance.
        method: None, a method name, or a function taking the module first.
        takes_training: whether the method takes `training`.
        variables: initial variables (`Module.init()` format) or None.
        rng_collections: the RNG streams fed to `apply`, or None for
            `("dropout", "params")`, through which any stream works.
        seed: not read here: the layer gives it to `Model.rng.init`.
    """
    del seed
    _sizes.refuse_in_fields(module)
    rngs = (
        _rng.CALL_STREAMS if rng_collections is None else tuple(rng_collections)
    )
    rules = tuple(nn.get_logical_axis_rules())
    wrapped = _Wrapped(module, method, takes_training, rngs, rules)
    model = _model(wrapped)
    if variables is None:
        return model
    params, state, axes = split(_checks.linen_variables(variables), rules)
    return model.replace(params=params, state=state, axes=axes)


def _model(wrapped: _Wrapped) -> Model:
    """The model of `wrapped`, without given weights."""
    return Model(
        init=functools.partial(
            _init,
            wrapped,
            _fast_init.run_once(functools.partial(_module_init, wrapped)),
        ),
        apply=functools.partial(_apply, wrapped),
        params=None,
        state=None,
        names=lambda trainable, parts: parts[1:] if trainable else parts,
        rng=Rng(
            init=_init_rng,
            call=functools.partial(_call_rng, wrapped.rngs),
            inference_error=(flax.errors.InvalidRngError,),
        ),
        takes_training=True,
        config=functools.partial(_config, wrapped),
        wrapped=wrapped.module,
        user_format=UserFormat(
            view=lambda tree: tree,
            to_user=variables_in_init_format,
            from_user=functools.partial(_from_user, wrapped.rules),
            argument="variables",
        ),
        fine_tuning=FineTuning(candidates=_candidates, variable_filters=False),
        quantization=Quantization(
            quantize=functools.partial(_quantized, wrapped),
            # `("params", *module path, name)`
            module_path=lambda parts: "/".join(parts[1:-1]),
        ),
        # Weights as `("params", *module path, name)`.
        structure=Structure(
            path_of=lambda trainable, parts: tuple(parts[1:]),
            nodes=functools.partial(_nodes, wrapped),
        ),
        diagnostics=_diagnostics(type(wrapped.module).__name__),
    )


def _diagnostics(label: str) -> Diagnostics:
    return Diagnostics(
        label=label,
        initializer="module",
        misfit_fix=(
            "Call the layer on inputs of the shape the variables were "
            "made for, or pass variables=None to initialise new weights."
        ),
        without_params=lambda state: variables_without_params(
            sorted(state or {})
        ),
    )


def variables_without_params(collections: Any) -> str:
    return (
        "`variables` has no 'params' collection, but the module creates "
        f"parameters. Received: variables with collections {collections}. "
        "Pass the whole result of `module.init(...)`, e.g. "
        "`variables={'params': params, **state}`."
    )


def _module_init(wrapped: _Wrapped, rng: Any, inputs: PyTree) -> Any:
    """`Module.init`'s variables (boxed), the method called in training."""
    return _user_code.user_code(wrapped.module.init)(
        rng, inputs, method=wrapped.method, **wrapped.kwargs(True)
    )


def _init(
    wrapped: _Wrapped, module_init: Any, rng: Any, inputs: PyTree
) -> tuple[Any, Any, Any]:
    return split(module_init(rng, inputs), wrapped.rules)


def _apply(
    wrapped: _Wrapped,
    params: PyTree,
    state: PyTree,
    rng: Any,
    inputs: PyTree,
    training: bool,
) -> tuple[Any, dict[Any, Any]]:
    outputs, mutated = _user_code.user_code(wrapped.module.apply)(
        {**params, **state},
        inputs,
        rngs=rng,
        method=wrapped.method,
        mutable=list(state),
        **wrapped.kwargs(training),
    )
    return outputs, {name: mutated.get(name, state[name]) for name in state}


def _init_rng(seed: Any) -> Any:
    return _rng.stream_keys(_rng.key_from_seed(seed), _rng.INIT_STREAMS)


def _call_rng(rngs: tuple[str, ...], key: Any) -> Any:
    return {} if key is None else _rng.stream_keys(key, rngs)


def _from_user(rules: Any, variables: PyTree) -> dict[Any, Any]:
    variables = _checks.linen_variables(variables, "flax_variables")
    return variables_in_init_format(*split(variables, rules)[:2])


def _candidates(params: PyTree) -> list[tuple[tuple[str, ...], Any, str]]:
    """Each parameter's path inside `params`, array and key."""
    return _variables.keyed_leaves(params, skip=1)


def _config(wrapped: _Wrapped) -> dict[str, Any]:
    module = wrapped.module
    entries = {
        "module": _serialization.serialize_module(module),
        "method": _serialization.serialize_method(type(module), wrapped.method),
    }
    if wrapped.rngs != _rng.CALL_STREAMS:
        entries["rng_collections"] = list(wrapped.rngs)
    return entries


def _quantized(
    wrapped: _Wrapped,
    rules: list[Any],
    params: PyTree,
    state: PyTree,
    inputs: PyTree,
) -> Model:
    """Qwix's quantized copy of the module, holding `params` quantized as
    its `init` lays them out (`_model.Quantization`)."""
    name, target = _quantize.method(wrapped.module, wrapped.method)
    quantized = _quantize.linen_module(wrapped.module, name, rules)
    quantized_init = _user_code.user_code(quantized.init)
    abstract = jax.eval_shape(
        lambda rng, x: quantized_init(
            rng, x, method=target, **wrapped.kwargs(True)
        ),
        _init_rng(None),
        inputs,
    )
    qparams = _quantize.linen_params(params["params"], abstract["params"])
    model = adapt(
        quantized,
        target,
        wrapped.takes_training,
        variables={"params": qparams, **state},
        rng_collections=wrapped.rngs,
        seed=None,
    )
    return model.replace(init=None)


def _nodes(
    wrapped: _Wrapped, params: PyTree, state: PyTree, inputs: PyTree
) -> Any:
    """The weights by collection, and the submodules met by a call on
    `inputs` in inference (`nn.intercept_methods`, traced abstractly; none
    where the call fails)."""
    found: dict[tuple[Any, ...], tuple[str, Any]] = {}
    variables = variables_in_init_format(params, state)

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        outputs = next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if path and path not in found and context.method_name != "setup":
            found[path] = (
                type(context.module).__name__,
                _summary.outputs_shape(outputs),
            )
        return outputs

    def call(variables: PyTree, inputs: PyTree) -> None:
        with nn.intercept_methods(record):
            _user_code.user_code(wrapped.module.apply)(
                variables,
                inputs,
                method=wrapped.method,
                mutable=True,
                **wrapped.kwargs(False),
            )

    # Where the call fails, the rows have no output shapes.
    _user_code.attempt(jax.eval_shape, call, variables, inputs)
    # Submodules in the order they are called; weights by collection.
    for collection, tree in variables.items():
        for keypath, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = _variables.path_parts(keypath)
            found.setdefault(path, (collection, None))
    return found


def split(
    variables: PyTree, rules: Any = ()
) -> tuple[dict[str, Any], dict[Any, Any], dict[Any, Any]]:
    """`Module.init` output -> `(params, state, axes)`.

    `params` keeps its collection key (`{"params": ...}`); boxed
    partitioning metadata is unwrapped into `axes`, and sown collections
    are dropped.
    """
    variables = flax.core.unfreeze(variables)
    axes = _partitioning(variables, rules)
    variables = dict(nn.meta.unbox(variables))
    sown = {k for k, v in variables.items() if _is_sown(v)}
    params = {"params": variables["params"]} if "params" in variables else {}
    state = {
        k: v
        for k, v in variables.items()
        if k not in _NEVER_STATE and k not in sown
    }
    return params, state, axes


def _is_sown(collection: Any) -> bool:
    """Whether a collection holds `sow` output: tuples of values."""
    leaves = jax.tree_util.tree_flatten_with_path(collection)[0]
    return bool(leaves) and all(
        any(isinstance(k, jax.tree_util.SequenceKey) for k in path)
        for path, _ in leaves
    )


def _partitioning(variables: PyTree, rules: Any) -> dict[Any, Any]:
    """Mesh axes of each boxed variable, by path text.

    Logical axis names are mapped with the box's rules, else the rules in
    force (`nn.logical_axis_rules`), else `rules`.
    """
    rules = tuple(nn.get_logical_axis_rules()) or rules
    boxes = jax.tree_util.tree_flatten_with_path(
        variables, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )[0]
    axes = {}
    for path, box in boxes:
        if isinstance(box, nn.LogicallyPartitioned):
            names = nn.logical_to_mesh_axes(box.names, box.rules or rules)
        elif isinstance(box, nn.Partitioned):
            names = box.names
        else:
            continue
        axes[_variables.path_text(path)] = tuple(names or ())
    return axes


def variables_in_init_format(params: PyTree, state: PyTree) -> dict[Any, Any]:
    """`{"params": ..., **collections}`, as `Module.init()` returns."""
    return {**(params or {}), **(state or {})}
