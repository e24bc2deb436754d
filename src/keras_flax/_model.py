"""The model contract: what an adapter gives the layer.

Each kind of model has one adapter, a function returning a `Model`:
`_functions.adapt` (`call_fn` / `init_fn`, Haiku pairs), `_linen.adapt`
and `_nnx.adapt`. The layer (`_layer.ModelLayer`) consumes a `Model` and
nothing else: it never asks which kind of model it holds.

    init(rng, inputs)                    -> raw initial variables
    split(raw)                           -> (params, state, axes)
    apply(params, state, rng, inputs, training) -> (outputs, new_state)

`params` (trainable) and `state` (non-trainable) are PyTrees of arrays,
or None; `axes` maps a leaf's path text to its mesh axes (Flax
partitioning metadata). `apply` is pure: it returns `new_state` (None for
a model holding no state) instead of writing anything. What `init` learns
comes back from `split` as data, and the layer stores it at build.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple


class Model(NamedTuple):
    """A wrapped model, as the layer sees it.

    Attributes:
        apply: `(params, state, rng, inputs, training) -> (outputs,
            new_state)`; `new_state` is None when the model holds none.
        init: `(rng, inputs) -> raw`, the initial variables at the inputs'
            shapes and dtypes; None when the weights are given.
        split: `raw -> (params, state, axes)`.
        params: the given trainable weights (copied), or None.
        state: the given non-trainable weights (copied), or None.
        given_shared: whether `params` and `state` are the arrays of the
            user's object (an NNX module's), which the variables then hold
            as they are (one copy of each weight); else they are copied.
        axes: mesh axes of the given weights, by leaf path text.
        rng_state: the names (as `name` gives them, path text) of the
            variables holding RNG state (keys and counts), which no
            checkpoint of weights holds.
        uses_rng: whether `apply` takes an `rng` (drawn in training).
        takes_training: whether `apply`'s result depends on `training`
            (else it is always given False: one trace for both modes).
        init_rng: `seed -> rng` passed to `init` (seed: int or None).
        call_rng: `raw key (uint32[2]) -> rng` passed to `apply`; `{}` or
            None is passed where no key is drawn.
        inference_rng_error: the exception with which `apply` asks for
            randomness outside training (then it is given some from then
            on), or `()` for none.
        name: `(trainable, path parts) -> variable name parts`.
        write_back: `path parts -> function(value)` copying a variable's
            value into the user's object (an NNX module), or None.
        user_trees: `(params, state) -> [(argument, tree)]`: the weights as
            the user gave them, for messages.
        misfit_fix: the fix a message about misfit weights gives.
        initializer: the argument that creates the weights, for messages.
        label: what messages call the model (its class name).
        created: `(params, state, inputs) -> paths` of the variables a call
            would create (a lazily built module), or None; it raises what
            the model raises on the inputs.
        view: `tree -> tree`: `params` / `state` as the layer shows them.
        user_variables: `(params, state) -> ` the variables in the model's
            own format (`flax_variables`).
        from_user: `variables -> tree`: variables in the model's own
            format as one tree whose paths are those of `view(params)` and
            `view(state)` (assigned to `flax_variables`); None where the
            model has no own format.
        not_trained: `params -> keys` (path texts, as `VariableTree.paths`)
            of the parameters `fit` does not train (the user's `wrt` leaves
            them out); it raises where the user's choice selects none.
        config: `() -> dict`: the config entries describing the model.
    """

    apply: Callable
    init: Callable | None = None
    split: Callable = lambda raw: (*raw, {})
    params: Any = None
    state: Any = None
    given_shared: bool = False
    axes: dict = {}
    rng_state: frozenset = frozenset()
    uses_rng: bool = False
    takes_training: bool = True
    init_rng: Callable | None = None
    call_rng: Callable = lambda key: key
    inference_rng_error: type | tuple = ()
    name: Callable = lambda trainable, parts: (
        parts if trainable else ("state", *parts)
    )
    write_back: Callable = lambda parts: None
    user_trees: Callable = lambda params, state: [
        ("params", params),
        ("state", state),
    ]
    misfit_fix: str = ""
    initializer: str = "init_fn"
    label: str = "call_fn"
    created: Callable | None = None
    view: Callable = lambda tree: tree
    user_variables: Callable = lambda params, state: (params, state)
    from_user: Callable | None = None
    not_trained: Callable = lambda params: frozenset()
    config: Callable = dict
