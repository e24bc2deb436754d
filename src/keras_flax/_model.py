"""The model contract: what an adapter gives the layer.

Each kind of model (see `_kinds`) has one adapter, a function returning a
`Model`: `_functions.adapt` (`call_fn` / `init_fn`, Haiku pairs),
`_linen.adapt` and `_nnx.adapt`. The layer (`_layer.ModelLayer`) consumes a
`Model` and nothing else: it never asks which kind of model it holds.

    init(rng, inputs)                           -> raw initial variables
    split(raw)                                  -> (params, state, axes)
    apply(params, state, rng, inputs, training) -> (outputs, new_state)

`params` (trainable) and `state` (non-trainable) are PyTrees of arrays,
or None; `axes` maps a leaf's path text to its mesh axes (Flax
partitioning metadata). `apply` is pure: it returns `new_state` (None for
a model holding no state) instead of writing anything. What `init` learns
comes back from `split` as data, and the layer stores it at build.

Every adapter gives the fields of `Model` that have no default. What only
some kinds have comes in optional groups: `UserFormat` (the model's own
variables format, and writing values back into the user's object),
`FineTuning` (choosing the parameters that train with `wrt`),
`Quantization` (Keras' `quantize`, through Qwix), `Structure` (the
submodules a nested summary shows) and `Diagnostics` (what messages say).
A kind without a group gets the layer's plain behaviour: trees shown as
they are, no `wrt`, one summary row, generic messages.
"""

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Protocol

PyTree = Any
Path = tuple[str, ...]
# Mesh axes of a leaf, by its path text (`"params/Dense_0/kernel"`).
Axes = Mapping[str, tuple[str | None, ...]]


class Init(Protocol):
    """`(rng, inputs) -> raw`: the initial variables at the inputs' shapes
    and dtypes, in the model's own format (`split` reads them)."""

    def __call__(self, rng: Any, inputs: PyTree, /) -> Any: ...


class Split(Protocol):
    """`raw -> (params, state, axes)`."""

    def __call__(self, raw: Any, /) -> tuple[PyTree, PyTree, Axes]: ...


class Apply(Protocol):
    """`(params, state, rng, inputs, training) -> (outputs, new_state)`;
    `new_state` is None where the model holds none."""

    def __call__(
        self,
        params: PyTree,
        state: PyTree,
        rng: Any,
        inputs: PyTree,
        training: bool,
        /,
    ) -> tuple[PyTree, PyTree]: ...


class Names(Protocol):
    """`(trainable, path parts) -> variable name parts`."""

    def __call__(self, trainable: bool, parts: Path, /) -> Path: ...


class Config(Protocol):
    """`() -> dict`: the config entries describing the model."""

    def __call__(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rng:
    """How the model uses randomness.

    Attributes:
        init: `seed -> rng` given to `init` (seed: int or None); None
            where the model has no `init`.
        call: `raw key (uint32[2]) or None -> rng` given to `apply`, or
            None where `apply` takes no randomness (no key is drawn).
        inference_error: the exceptions with which `apply` asks for
            randomness outside training (it is given some from then on).
    """

    init: Callable[[int | None], Any] | None = None
    call: Callable[[Any], Any] | None = None
    inference_error: tuple[type[BaseException], ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserFormat:
    """The model's own format of its variables (`flax_variables`).

    Attributes:
        view: `tree -> tree`: `params` / `state` as the layer shows them.
        to_user: `(params, state) -> variables` in the model's format.
        from_user: `variables -> tree` whose paths are those of
            `view(params)` and `view(state)` together (assigned to
            `flax_variables`).
        write_back: `path parts -> function(value) or None` copying a
            variable's value into the user's object (an NNX module), or
            None where the model writes nothing back.
    """

    view: Callable[[PyTree], PyTree]
    to_user: Callable[[PyTree, PyTree], Any]
    from_user: Callable[[Any], PyTree]
    write_back: Callable[[Path], Callable[[Any], None] | None] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FineTuning:
    """What `wrt` (a Flax NNX filter) chooses among.

    Attributes:
        candidates: `params -> [(path, value, key)]`: for each parameter
            the path and value the filter is given, and the key (path
            text, as `VariableTree.paths`) naming it.
        variable_filters: whether filters on Variable types and tags
            (`nnx.LoRAParam`, a tag string) apply: values are Variables.
    """

    candidates: Callable[[PyTree], Sequence[tuple[Any, Any, str]]]
    variable_filters: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantization:
    """How the model is quantized (`layer.quantize`, see `_quantize`).

    Attributes:
        quantize: `(rules, params, state, inputs) -> (Model, module)`: the
            model Qwix's post-training quantization under `rules` (Qwix
            `QuantizationRule`s) makes of this one at the current `params`
            and `state`, run on `inputs` where Qwix needs a call, and the
            quantized module it wraps. The model's `params` and `state`
            are the quantized arrays and its `init` None; it is given this
            model's `config` (a saved layer is rebuilt float, then
            quantized).
        module_path: `weight path parts -> module path`: the path (as
            Qwix's rules match it, `/`-joined) of the module holding the
            parameter at those parts of `params` (`("params", "Dense_0",
            "kernel")` -> `"Dense_0"`).
        float_paths: the module paths that stay float: LoRA adapters,
            which train on the quantized base.
    """

    quantize: Callable[[list[Any], PyTree, PyTree, PyTree], tuple["Model", Any]]
    module_path: Callable[[tuple[str, ...]], str]
    float_paths: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Structure:
    """What the model is made of: its submodules, as
    `model.summary(expand_nested=True)` shows them (see `_summary`).

    Attributes:
        path_of: `(trainable, path parts) -> path`: the path in the module
            (a tuple, the module's own keys) of the leaf at those parts of
            `params` (trainable) or `state`.
        nodes: `(params, state, inputs) -> {path: (label, output shape)}`:
            each submodule (label: its class name) and weight (label: its
            kind, a Variable type or collection) by path, the model itself
            left out, with the shape of the output of the submodule's
            first call when the model is called on `inputs` (symbolic
            `jax.ShapeDtypeStruct`s): a tuple, None for unknown sizes;
            None where it is not one array, or not known. `params` and
            `state` are shapes.
    """

    path_of: Callable[[bool, tuple[str, ...]], tuple[Any, ...]]
    nodes: Callable[
        [PyTree, PyTree, PyTree],
        Mapping[tuple[Any, ...], tuple[str, Any]],
    ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Diagnostics:
    """What messages say about the model, and checks that only explain.

    Attributes:
        label: what messages call the model (its class name).
        initializer: the argument that creates the weights.
        misfit_fix: the fix a message about misfit weights gives
            (`{arg}`: the argument holding them).
        user_trees: `(params, state) -> [(argument, tree)]`: the weights
            as the user gave them.
        without_params: `state -> message` where given weights hold no
            parameters though `init` creates some, or None.
    """

    label: str = "the model"
    initializer: str = "init"
    misfit_fix: str = (
        "Call the layer on inputs of the shape the weights were made for."
    )
    user_trees: Callable[[PyTree, PyTree], list[tuple[str, PyTree]]] = (
        lambda params, state: [("params", params), ("state", state)]
    )
    without_params: Callable[[PyTree], str] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Model:
    """A wrapped model, as the layer sees it.

    Attributes:
        init: the initial variables, or None when the weights are given.
        split: `init`'s output as `(params, state, axes)`.
        apply: the pure forward pass.
        params: the given trainable weights, or None.
        state: the given non-trainable weights, or None.
        names: the Keras variable name of each leaf.
        rng: how `init` and `apply` take randomness.
        takes_training: whether `apply`'s result depends on `training`
            (else it is always given False: one trace for both modes).
        config: the config entries that rebuild the model.
        shares_given: whether `params` and `state` are the arrays of the
            user's object (an NNX module's), which the variables then hold
            as they are (one copy of each weight); else they are copied.
        axes: mesh axes of the given weights.
        rng_state: the names (as `names` gives them, path text) of the
            variables holding RNG state, which no checkpoint holds.
        user_format: the model's own variables format, or None.
        fine_tuning: what `wrt` chooses among, or None (no `wrt`).
        quantization: how `layer.quantize` quantizes it, or None (it
            does not: `NotImplementedError`, as a native layer).
        structure: its submodules, or None (the summary shows the layer
            as one row).
        diagnostics: what messages say.
        build: `(specs, layer name) -> (Model, module) or None`, for a
            model completed by the inputs: a module creating its variables
            on its first call, or sized from its inputs. At build, given
            the input specs (`_inputs.Specs`), it makes the complete model
            (its weights given, its own `build` None or that of a further
            step) and the module it wraps, which replace this one; None
            where there is nothing to complete. None for a complete model.
    """

    init: Init | None
    split: Split
    apply: Apply
    params: PyTree
    state: PyTree
    names: Names
    rng: Rng
    takes_training: bool
    config: Config
    shares_given: bool = False
    axes: Axes = dataclasses.field(default_factory=dict)
    rng_state: frozenset[str] = frozenset()
    user_format: UserFormat | None = None
    fine_tuning: FineTuning | None = None
    quantization: Quantization | None = None
    structure: Structure | None = None
    diagnostics: Diagnostics = Diagnostics()
    build: Callable[[Any, str], tuple["Model", Any] | None] | None = None

    def replace(self, **changes: Any) -> "Model":
        """This model with `changes` (field values) made."""
        return dataclasses.replace(self, **changes)
