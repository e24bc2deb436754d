"""A Flax linen module and its forward method as a `Model`.

`init` is `Module.init`; `split` turns its output into `params` (the
`params` collection, kept under its key as `keras.layers.FlaxLayer` keeps
it), `state` (every other collection but what modules `sow`) and the mesh
axes of boxed (partitioned) variables; `apply` is `Module.apply` with the
state's collections mutable, so what a module sows is dropped.
"""

from typing import Any

import flax
import flax.core
import flax.errors
import flax.linen as nn
import jax

from keras_flax import _checks
from keras_flax import _errors
from keras_flax import _fast_init
from keras_flax import _quantize
from keras_flax import _rng
from keras_flax import _serialization
from keras_flax import _sizes
from keras_flax import _summary
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
    # Logical axis rules in force when the layer is made, for boxes
    # without rules of their own that are split outside any rules scope.
    rules = tuple(nn.get_logical_axis_rules())
    training_kwargs = (
        (lambda training: {"training": training})
        if takes_training
        else (lambda training: {})
    )

    module_init = _errors.user_code(module.init)
    module_apply = _errors.user_code(module.apply)

    def init(rng: Any, inputs: PyTree) -> Any:
        return module_init(rng, inputs, method=method, **training_kwargs(True))

    def apply(
        params: PyTree, state: PyTree, rng: Any, inputs: PyTree, training: bool
    ) -> tuple[Any, dict[Any, Any]]:
        outputs, mutated = module_apply(
            {**params, **state},
            inputs,
            rngs=rng,
            method=method,
            mutable=list(state),
            **training_kwargs(training),
        )
        return outputs, {name: mutated.get(name, state[name]) for name in state}

    def split_variables(
        variables: PyTree,
    ) -> tuple[dict[str, Any], dict[Any, Any], dict[Any, Any]]:
        return split(variables, rules)

    def from_user(variables: PyTree) -> dict[Any, Any]:
        variables = _checks.linen_variables(variables, "flax_variables")
        return variables_in_init_format(*split(variables, rules)[:2])

    def candidates(params: PyTree) -> list[tuple[tuple[str, ...], Any, str]]:
        """Each parameter's path inside `params`, array and key."""
        return _variables.keyed_leaves(params, skip=1)

    params = state = None
    axes = {}
    if variables is not None:
        params, state, axes = split(_checks.linen_variables(variables), rules)

    def config() -> dict[str, Any]:
        entries = {
            "module": _serialization.serialize_module(module),
            "method": _serialization.serialize_method(type(module), method),
        }
        if rngs != _rng.CALL_STREAMS:
            entries["rng_collections"] = list(rngs)
        return entries

    def quantize(
        rules: list[Any], params: PyTree, state: PyTree, inputs: PyTree
    ) -> tuple[Model, Any]:
        """Qwix's quantized copy of the module, holding `params` quantized
        as its `init` lays them out (`_model.Quantization`)."""
        name, target = _quantize.method(module, method)
        quantized = _quantize.linen_module(module, name, rules)
        quantized_init = _errors.user_code(quantized.init)
        abstract = jax.eval_shape(
            lambda rng, x: quantized_init(
                rng, x, method=target, **training_kwargs(True)
            ),
            _rng.stream_keys(_rng.key_from_seed(None), _rng.INIT_STREAMS),
            inputs,
        )
        qparams = _quantize.linen_params(params["params"], abstract["params"])
        model = adapt(
            quantized,
            target,
            takes_training,
            variables={"params": qparams, **state},
            rng_collections=rng_collections,
            seed=None,
        )
        return model.replace(init=None), quantized

    def nodes(params: PyTree, state: PyTree, inputs: PyTree) -> Any:
        """The weights by collection, and the submodules met by a call on
        `inputs` in inference (`nn.intercept_methods`, traced abstractly;
        none where the call fails)."""
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
                module_apply(
                    variables,
                    inputs,
                    method=method,
                    mutable=True,
                    **training_kwargs(False),
                )

        try:
            jax.eval_shape(call, variables, inputs)
        except _errors.UserCodeError:
            pass  # the rows have no output shapes
        # Submodules in the order they are called; weights by collection.
        for collection, tree in variables.items():
            for keypath, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
                path = _variables.path_parts(keypath)
                found.setdefault(path, (collection, None))
        return found

    return Model(
        init=_fast_init.run_once(init),
        split=split_variables,
        apply=apply,
        params=params,
        state=state,
        names=lambda trainable, parts: parts[1:] if trainable else parts,
        rng=Rng(
            init=lambda seed: _rng.stream_keys(
                _rng.key_from_seed(seed), _rng.INIT_STREAMS
            ),
            call=lambda key: {} if key is None else _rng.stream_keys(key, rngs),
            inference_error=(flax.errors.InvalidRngError,),
        ),
        takes_training=True,
        config=config,
        axes=axes,
        user_format=UserFormat(
            view=lambda tree: tree,
            to_user=variables_in_init_format,
            from_user=from_user,
        ),
        fine_tuning=FineTuning(candidates=candidates, variable_filters=False),
        quantization=Quantization(
            quantize=quantize,
            # `("params", *module path, name)`
            module_path=lambda parts: "/".join(parts[1:-1]),
        ),
        # Weights as `("params", *module path, name)`.
        structure=Structure(
            path_of=lambda trainable, parts: tuple(parts[1:]), nodes=nodes
        ),
        diagnostics=Diagnostics(
            label=type(module).__name__,
            initializer="module",
            misfit_fix=(
                "Call the layer on inputs of the shape the variables were "
                "made for, or pass variables=None to initialise new weights."
            ),
            user_trees=lambda params, state: [
                ("variables", variables_in_init_format(params, state))
            ],
            without_params=lambda state: _errors.variables_without_params(
                sorted(state or {})
            ),
        ),
    )


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
