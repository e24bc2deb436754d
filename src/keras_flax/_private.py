"""Every private name of Keras and JAX that the library reaches.

Each is used for a measured gain, or for a hook Keras has no public form
of, and each has a public fallback, taken where the name is missing (a
version guard) and run by a test:

- Keras' scope getters and `Variable._value`: eager calls read the held
  arrays directly (W3, 258 leaves: 1.73x -> 1.45x of a jitted apply).
  Fallback: every read through `.value`.
- `Layer._track_variable` / `_untrack_variable`: variables created under
  nested name scopes (the Flax path) are tracked as `add_weight` would
  track them, and a quantized layer's float weights untracked as `Dense`
  untracks its kernel. Fallback: tracked as a layer attribute, which Keras
  tracks publicly, and untracked by deleting it.
- `Layer._tracker`: Keras locks a built layer's tracker, and Keras 3.16
  no longer unlocks it around a layer's own `quantize` (3.14 and 3.15
  wrap every `quantize` in an unlock); the quantized weights are made
  with it unlocked. Fallback (no tracker): made as they are.
- The private attributes Keras' `model.summary` reads of each nested layer
  it prints (`_inbound_nodes`, `_build_shapes_dict`): a wrapped module's
  rows (`_summary.Row`) carry them, so that `expand_nested=True` shows
  the submodules. Found by the names Keras' summary functions read.
  Fallback (Keras reading other private names): no rows, the layer shown
  as one row.
- `serialization_lib.in_safe_mode`: whether `load_model` runs in safe
  mode. Fallback: safe mode assumed (the stricter rule).
- `Variable._initialize_layout` (overridden by `FlaxVariable`, with the
  public `assign`): Flax partitioning metadata becomes the layout, and
  every value assigned outside a `StatelessScope` is copied into the user's
  NNX module. Fallback: plain Keras variables (layouts from the `LayoutMap`
  alone; the NNX module is synced when read through `FlaxLayer.module`).
- `ModelParallel._layout_map`: a `LayoutMap` entry wins over Flax's axes,
  and its keys aimed at a layer that match none of its weights warn.
  Fallback: Flax's axes where they fit the mesh; no warning.
- JAX equation internals (`eqn.ctx`, `get_bind_params`,
  `compiler_options_kvs`) and XLA flag names: many-leaf initialisation op
  by op, skipping dead equations, compiled at the cheapest options (W3
  initialisation 1.8 s -> 0.9 s). Fallback: `jax.extend.core.jaxpr_as_fun`
  and default compiler options.
- jax2onnx (no public hook tells that a conversion is in progress, nor
  lets a layer run Flax's pooling as Flax documents it): a layer traced by
  jax2onnx is found by jax2onnx's frames on the call stack, its program is
  checked against jax2onnx's registry of converted primitives (an
  unconvertible operation is named with the layer), and Flax's `avg_pool`,
  which jax2onnx swaps process-wide for a keyword-only function, takes
  positional arguments again while the layer is traced. Fallback (no
  frames to read, or no registry): the conversion runs as jax2onnx runs
  it, and jax2onnx names what it cannot convert. Whether jax2onnx's `jit`
  plugin can lower a jitted function inside a custom derivative (it reads
  `jax._src.core.ClosedJaxpr`, gone in JAX 0.12): a program that needs it
  is refused before anything is written. Fallback (the plugin not found):
  the conversion runs as jax2onnx runs it.
"""

import contextlib
import inspect
import sys
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import flax.linen
import flax.linen.pooling
import jax
import jax.extend
import keras
from flax import nnx

from keras_flax import _backends
from keras_flax._model import PyTree

try:
    from keras.src.backend.common.stateless_scope import in_stateless_scope
    from keras.src.backend.common.variables import get_autocast_scope

    SCOPE_CHECKS = (in_stateless_scope, get_autocast_scope)
except ImportError:  # pragma: no cover (a Keras without these modules)
    SCOPE_CHECKS = None

try:
    from keras.src.saving.serialization_lib import in_safe_mode as _safe_mode
except ImportError:  # pragma: no cover (a Keras without it)
    _safe_mode = None

try:
    from keras.src.utils import summary_utils as _summary_utils
except ImportError:  # pragma: no cover (a Keras without the module)
    _summary_utils = None

TRACK_VARIABLE = hasattr(keras.layers.Layer, "_track_variable") and hasattr(
    keras.layers.Layer, "_untrack_variable"
)
VARIABLE_HOOKS = SCOPE_CHECKS is not None and hasattr(
    keras.Variable, "_initialize_layout"
)


# Keras variables and layers.


def held_values(variables: PyTree) -> list[Any | None] | None:
    """The arrays `variables` hold, when each `.value` is that array (no
    `keras.StatelessScope` or autocast scope in force, JAX backend); else
    None, and the caller reads `.value`."""
    if SCOPE_CHECKS is None or keras.backend.backend() != "jax":
        return None  # PyTorch's variables, for one, compute `.value`
    in_stateless, autocast_scope = SCOPE_CHECKS
    if in_stateless() or autocast_scope() is not None:
        return None
    held = [getattr(variable, "_value", None) for variable in variables]
    return None if any(value is None for value in held) else held


def track_variable(layer: Any, variable: Any) -> None:
    """Tracks `variable` as one of `layer`'s weights."""
    if TRACK_VARIABLE:
        layer._track_variable(variable)
    else:
        setattr(layer, _attribute(variable), variable)


def untrack_variable(layer: Any, variable: Any) -> None:
    """Stops tracking `variable` (`track_variable`'s) as `layer`'s."""
    if TRACK_VARIABLE:
        layer._untrack_variable(variable)
    else:
        delattr(layer, _attribute(variable))


@contextlib.contextmanager
def tracker_unlocked(layer: Any) -> Iterator[None]:
    """Lets `layer`, built, create variables; its tracker's lock state is
    restored after."""
    tracker = getattr(layer, "_tracker", None)
    locked = getattr(tracker, "locked", False)
    if locked:
        tracker.unlock()  # type: ignore[union-attr]
    try:
        yield
    finally:
        if locked:
            tracker.lock()  # type: ignore[union-attr]


def _attribute(variable: Any) -> str:
    """The layer attribute holding a variable tracked publicly."""
    return f"_keras_flax_{id(variable)}"


# The private names Keras' summary may read of a nested layer's row
# (`_keras_history` of the tensors of its nodes, which rows have none of).
_SUMMARY_ROW_NAMES = frozenset(
    ("_inbound_nodes", "_build_shapes_dict", "_keras_history")
)
# Keras' functions printing one row of a layer, and their nested ones.
_SUMMARY_ROW_FUNCTIONS = (
    "format_layer_shape",
    "get_layer_fields",
    "get_connections",
    "print_layer",
)


def _private_names_read(module: Any) -> frozenset[str] | None:
    """The private attribute names Keras' functions printing a summary row
    read, or None where they are not found."""
    if module is None or not hasattr(module, "print_summary"):
        return None
    found: set[str] = set()
    codes = [module.format_layer_shape.__code__, module.print_summary.__code__]
    seen = set()
    while codes:
        code = codes.pop()
        if code.co_name in _SUMMARY_ROW_FUNCTIONS:
            seen.add(code.co_name)
            found.update(
                name
                for name in code.co_names
                if name.startswith("_") and not name.startswith("__")
            )
        codes.extend(c for c in code.co_consts if inspect.iscode(c))
    if seen != set(_SUMMARY_ROW_FUNCTIONS):
        return None
    return frozenset(found)


def nested_summary(module: Any = _summary_utils) -> bool:
    """Whether Keras' summary reads of a nested row only the private names
    `set_summary_row` gives (else no rows are given: one row per layer)."""
    names = _private_names_read(module)
    return names is not None and names <= _SUMMARY_ROW_NAMES


NESTED_SUMMARY = nested_summary()


def set_summary_row(row: Any, output_shape: Any) -> None:
    """Gives a `_summary.Row` the private attributes Keras' summary reads:
    no call nodes, and build shapes only where the output shape is known
    (Keras then prints the row's `output_shape`, else "?")."""
    known = {"output_shape": output_shape} if output_shape is not None else {}
    row._inbound_nodes = []
    row._build_shapes_dict = known


def in_safe_mode() -> bool:
    """Whether Keras is loading in safe mode (assumed, when unknown)."""
    return _safe_mode is None or _safe_mode() is not False


def layout_map(distribution: Any) -> Any:
    """`distribution`'s `LayoutMap` (`ModelParallel`), or None."""
    return getattr(distribution, "_layout_map", None)


def layout_map_has(distribution: Any, path: str) -> bool:
    """Whether `distribution`'s `LayoutMap` has an entry for `path`."""
    found = layout_map(distribution)
    return found is not None and found[path] is not None


class FlaxVariable(keras.Variable):
    """A Keras variable that keeps what Flax knows about it.

    Args:
        layout: a function of the variable's path giving its layout (from
            Flax's partitioning; None to let Keras choose), or None.
        mirror: a function into which every concrete value the variable is
            given is copied (the user's NNX module, see `_nnx`), or None.
    """

    def __init__(
        self, *args: Any, layout: Any = None, mirror: Any = None, **kwargs: Any
    ) -> None:
        self._flax_layout = layout
        self._mirror = None  # not while Keras sets the initial value
        super().__init__(*args, **kwargs)
        self._mirror = mirror

    def _initialize_layout(self) -> None:
        if self._layout is None and self._flax_layout is not None:
            self._layout = self._flax_layout(self.path)
        super()._initialize_layout()

    def assign(self, value: Any) -> Any:
        value = super().assign(value)
        # Not a `StatelessScope`'s update (whose values are not written).
        written = SCOPE_CHECKS is not None and not SCOPE_CHECKS[0]()
        if written and self._mirror is not None:
            # The array now held (laid out, where it has a layout).
            held = getattr(self, "_value", None)
            held = value if held is None else held
            if held is not None and _backends.is_concrete(held):
                self._mirror(_backends.to_jax(held))
        return value


# JAX programs run once.

# Initialisation runs once: XLA's cheapest compilation does.
RUN_ONCE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def compile_once(lowered: Any) -> Any:
    """`lowered` compiled at XLA's cheapest options, where the platform
    takes them."""
    try:
        return lowered.compile(compiler_options=RUN_ONCE_OPTIONS)
    except Exception:  # a platform without these options
        return lowered.compile()


def run_op_by_op(closed_jaxpr: Any, args: Any, cheapest: Any = True) -> Any:
    """Evaluates a traced program one equation at a time.

    As `jax.extend.core.jaxpr_as_fun` does, with two savings for a program
    run once: equations whose results are never used are skipped (a linen
    `init` computes the module's outputs, which `init` drops), and, where
    `cheapest`, nested jitted functions (the random initialisers) are
    compiled with XLA's cheapest options. Where anything fails, the program
    runs again as `jaxpr_as_fun` runs it (which raises the error if it is
    the program's).
    """
    jaxpr = closed_jaxpr.jaxpr
    eqns = _live(jaxpr)
    try:
        return _evaluate(jaxpr, closed_jaxpr.consts, args, eqns, cheapest)
    except Exception:
        return jax.extend.core.jaxpr_as_fun(closed_jaxpr)(*args)


def _live(jaxpr: Any) -> list[Any]:
    """The equations whose results reach the outputs (or have effects)."""
    Var = jax.extend.core.Var
    needed = {v for v in jaxpr.outvars if isinstance(v, Var)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in needed for v in eqn.outvars):
            live.append(eqn)
            needed.update(v for v in eqn.invars if isinstance(v, Var))
    return live[::-1]


def _evaluate(
    jaxpr: Any, consts: Any, args: Any, eqns: Any, cheapest: Any
) -> list[Any]:
    Literal = jax.extend.core.Literal
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    # Each value is dropped after its last use (a large module's kernels
    # before scaling would otherwise all stay alive until the end).
    last_use = {}
    for i, eqn in enumerate(eqns):
        for v in eqn.invars:
            if not isinstance(v, Literal):
                last_use[v] = i
    kept = {v for v in jaxpr.outvars if not isinstance(v, Literal)}

    for i, eqn in enumerate(eqns):
        params = eqn.params
        nested_jit = params.get("compiler_options_kvs") == ()
        if cheapest and nested_jit:
            options = tuple(RUN_ONCE_OPTIONS.items())
            params = {**params, "compiler_options_kvs": options}
        bind_params = eqn.primitive.get_bind_params(params)
        subfuns = ()
        if isinstance(bind_params, tuple):  # JAX 0.8: (subfuns, params)
            subfuns, bind_params = bind_params
        with eqn.ctx.manager:
            out = eqn.primitive.bind(
                *subfuns, *map(read, eqn.invars), **bind_params
            )
        if not eqn.primitive.multiple_results:
            out = [out]
        env.update(zip(eqn.outvars, out, strict=True))
        for v in eqn.invars:
            if isinstance(v, Literal) or v in kept:
                continue
            if last_use[v] == i:
                env.pop(v, None)
    return [read(v) for v in jaxpr.outvars]


# jax2onnx.

FRAMES = inspect.currentframe() is not None
# Flax's pooling functions as imported, before any conversion swaps them.
_POOLS = {
    (owner, "avg_pool"): owner.avg_pool
    for owner in (flax.linen, flax.linen.pooling, nnx)
}


def jax2onnx_converting() -> bool:
    """Whether a jax2onnx conversion is tracing the caller (False where no
    frames can be read)."""
    if "jax2onnx" not in sys.modules or not FRAMES:
        return False
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("jax2onnx."):
            return True
        frame = frame.f_back
    return False


def jax2onnx_primitives() -> frozenset[Any] | None:
    """The names of the primitives jax2onnx converts, or None where its
    registry cannot be read."""
    try:
        from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY
    except ImportError:  # pragma: no cover (a jax2onnx without it)
        return None
    return frozenset(PLUGIN_REGISTRY)


def jax2onnx_lowers_nested_jit() -> bool:
    """Whether jax2onnx can lower a jitted function called inside a
    function with a custom derivative (`jax.nn.relu` on JAX 0.12, kept by
    a module as its activation): its `jit` plugin reads
    `jax._src.core.ClosedJaxpr`, which JAX 0.12 no longer has (jax2onnx
    0.17.1). True where that plugin cannot be read."""
    try:
        from jax2onnx.plugins.jax.core import jit as jit_plugin
    except ImportError:  # pragma: no cover (a jax2onnx without it)
        return True
    core = getattr(jit_plugin, "jcore", None)
    return core is None or hasattr(core, "ClosedJaxpr")


@contextlib.contextmanager
def flax_pools_as_documented() -> Iterator[None]:
    """Within: Flax's `avg_pool` takes `window_shape`, `strides` and
    `padding` by position too, where a conversion swapped it."""
    swapped = {
        place: getattr(*place)
        for place, original in _POOLS.items()
        if getattr(*place) is not original
    }
    for (owner, attr), replacement in swapped.items():
        setattr(owner, attr, _by_keyword(replacement))
    try:
        yield
    finally:
        for (owner, attr), replacement in swapped.items():
            setattr(owner, attr, replacement)


def _by_keyword(pool: Callable[..., Any]) -> Callable[..., Any]:
    def avg_pool(
        inputs: PyTree,
        window_shape: Any,
        strides: Any = None,
        padding: Any = "VALID",
        **rest: Any,
    ) -> Any:
        return pool(
            inputs,
            window_shape=window_shape,
            strides=strides,
            padding=padding,
            **rest,
        )

    return avg_pool
