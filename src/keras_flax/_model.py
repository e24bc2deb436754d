"""The model contract: what an adapter gives the layer.

Each kind of model (see `_kinds`) has one adapter, a function returning a
`Model`: `_functions.adapt` (`call_fn` / `init_fn`, Haiku pairs),
`_linen.adapt`, `_nnx.adapt` and `_equinox.adapt`. The layer
(`_layer.ModelLayer`) consumes a `Model` and nothing else: it never asks
which kind of model it holds.

    init(rng, inputs)                           -> (params, state, axes)
    apply(params, state, rng, inputs, training) -> (outputs, new_state)

`params` (trainable) and `state` (non-trainable) are PyTrees of arrays,
or None; `axes` maps a leaf's path text to its mesh axes (Flax
partitioning metadata). `apply` is pure: it returns `new_state` (None for
a model holding no state) instead of writing anything. What `init` learns
comes back as data, and the layer stores it at build.

Every adapter gives the fields of `Model` that have no default. What only
some kinds have comes in optional groups: `UserFormat` (the model's own
variables format, and writing values back into the user's object),
`FineTuning` (choosing the parameters that train with `wrt`),
`Quantization` (Keras' `quantize`, through Qwix), `Structure` (the
submodules a nested summary shows) and `Live` (a module that holds its
own arrays and may be completed by its first inputs, as NNX modules are).
`Diagnostics` only says what messages call things. A kind without a group
gets the layer's plain behaviour: trees shown as they are, no `wrt`, one
summary row, weights copied from what is given.

A minimal model, the contract alone:

>>> import jax, jax.numpy as jnp
>>> model = Model(
...     init=lambda rng, x: ({"w": jnp.ones((x.shape[-1], 2))}, None, {}),
...     apply=lambda p, s, rng, x, training: (x @ p["w"], None),
...     params=None,
...     state=None,
...     names=lambda trainable, parts: parts,
...     rng=Rng(init=jax.random.key),
...     takes_training=False,
...     config=dict,
... )
>>> from keras_flax._layer import ModelLayer
>>> ModelLayer(model, seed=0)(jnp.ones((3, 4))).shape
(3, 2)
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
    """`(rng, inputs) -> (params, state, axes)`: the initial variables at
    the inputs' shapes and dtypes, and the mesh axes their metadata names.
    Traced abstractly too (`jax.eval_shape`): `axes` is plain data."""

    def __call__(
        self, rng: Any, inputs: PyTree, /
    ) -> tuple[PyTree, PyTree, Axes]: ...


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


@dataclasses.dataclass(frozen=True)
class Call:
    """A module class and the constructor arguments that make the module
    to wrap (`FlaxLayer.from_nnx`, `EquinoxLayer.from_constructor`, a
    saved config): the adapter constructs the module (or leaves it to the
    build, where its sizes follow the input) and saves the call."""

    module_class: type
    args: tuple
    kwargs: dict


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
        argument: the layer argument taking the weights in this format
            (`"variables"`), by which checks of given weights name them;
            None where they are given as `params` and `state`.
    """

    view: Callable[[PyTree], PyTree]
    to_user: Callable[[PyTree, PyTree], Any]
    from_user: Callable[[Any], PyTree]
    write_back: Callable[[Path], Callable[[Any], None] | None] | None = None
    argument: str | None = None


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
        quantize: `(rules, params, state, inputs) -> Model`: the model
            Qwix's post-training quantization under `rules` (Qwix
            `QuantizationRule`s) makes of this one at the current `params`
            and `state`, run on `inputs` where Qwix needs a call, wrapping
            the quantized module. The model's `params` and `state` are the
            quantized arrays and its `init` None; it is given this model's
            `config` (a saved layer is rebuilt float, then quantized).
        module_path: `weight path parts -> module path`: the path (as
            Qwix's rules match it, `/`-joined) of the module holding the
            parameter at those parts of `params` (`("params", "Dense_0",
            "kernel")` -> `"Dense_0"`).
        float_paths: the module paths that stay float: LoRA adapters,
            which train on the quantized base.
    """

    quantize: Callable[[list[Any], PyTree, PyTree, PyTree], "Model"]
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
class Live:
    """A module that holds its own arrays (an NNX module): the layer holds
    them in place of the module and writes its values back into it
    (`UserFormat.write_back`).

    Attributes:
        rng_state: the names (as `names` gives them, path text) of the
            variables holding RNG state, which no checkpoint holds.
        build: `(specs, layer name) -> Model or None`, for a module that
            its first inputs complete: one creating its variables on its
            first call, or sized from its inputs. At build, given the
            input specs (`_inputs.Specs`), it makes the complete model
            (its weights given, its `wrapped` the module), which replaces
            this one; None where there is nothing to complete. None for a
            complete module.
    """

    rng_state: frozenset[str] = frozenset()
    build: Callable[[Any, str], "Model | None"] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Diagnostics:
    """What messages say about the model.

    Attributes:
        label: what messages call the model (its class name).
        initializer: the argument that creates the weights.
        misfit_fix: the fix a message about misfit weights gives
            (`{arg}`: the argument holding them).
        without_params: `state -> message` where given weights hold no
            parameters though `init` creates some, or None.
    """

    label: str = "the model"
    initializer: str = "init"
    misfit_fix: str = (
        "Call the layer on inputs of the shape the weights were made for."
    )
    without_params: Callable[[PyTree], str] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Model:
    """A wrapped model, as the layer sees it.

    Attributes:
        init: the initial variables, or None when the weights are given.
        apply: the pure forward pass.
        params: the given trainable weights, or None.
        state: the given non-trainable weights, or None.
        names: the Keras variable name of each leaf.
        rng: how `init` and `apply` take randomness.
        takes_training: whether `apply`'s result depends on `training`
            (else it is always given False: one trace for both modes).
        config: the config entries that rebuild the model.
        axes: mesh axes of the given weights.
        wrapped: the object the model adapts (the user's module), as the
            layer's `module` shows it; None for models of functions.
        user_format: the model's own variables format, or None.
        fine_tuning: what `wrt` chooses among, or None (no `wrt`).
        quantization: how `layer.quantize` quantizes it, or None (it
            does not: `NotImplementedError`, as a native layer).
        structure: its submodules, or None (the summary shows the layer
            as one row).
        live: a module holding its own arrays, or None (the given weights
            are copied, and nothing is completed at build).
        diagnostics: what messages say.
    """

    init: Init | None
    apply: Apply
    params: PyTree
    state: PyTree
    names: Names
    rng: Rng
    takes_training: bool
    config: Config
    axes: Axes = dataclasses.field(default_factory=dict)
    wrapped: Any = None
    user_format: UserFormat | None = None
    fine_tuning: FineTuning | None = None
    quantization: Quantization | None = None
    structure: Structure | None = None
    live: Live | None = None
    diagnostics: Diagnostics = Diagnostics()

    def replace(self, **changes: Any) -> "Model":
        """This model with `changes` (field values) made."""
        return dataclasses.replace(self, **changes)
