"""A layer traced by jax2onnx (Keras' `model.export(format="onnx")`).

Keras calls the model under jax2onnx's trace. A layer called there
(`_private.jax2onnx_converting`)
- checks its own program against jax2onnx's registry of converted
  primitives, so that an operation jax2onnx lacks is reported with the
  layer holding it and the fix, instead of as a bare primitive name once
  the whole model is traced;
- runs with Flax's `avg_pool` callable as Flax documents it
  (`_private.flax_pools_as_documented`): jax2onnx swaps it for a function
  taking `window_shape`, `strides` and `padding` by keyword only, which
  fails for `nn.avg_pool(x, (2, 2), (2, 2))`;
- refuses, before anything is written, a program calling a jitted function
  inside a function with a custom derivative where jax2onnx cannot lower
  it (`_private.jax2onnx_lowers_nested_jit`: JAX 0.12 with jax2onnx
  0.17.1, for an activation such as `jax.nn.relu` that a module keeps).
"""

import functools
from collections.abc import Callable
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import jax
import jax.core

from keras_flax import _private
from keras_flax._errors import quoted
from keras_flax._model import PyTree


def converting(inputs: PyTree) -> bool:
    """Whether `inputs` are traced by a jax2onnx conversion in progress."""
    traced = any(
        isinstance(x, jax.core.Tracer)
        for x in jax.tree_util.tree_leaves(inputs)
    )
    return traced and _private.jax2onnx_converting()


def guarded(
    layer_name: str,
    run: Any,
    fn: Callable[..., Any],
    quantized: str | None = None,
) -> Callable[..., Any]:
    """`run` (the layer's runner of `fn`), which under a jax2onnx conversion
    checks `fn` first and runs with Flax's pooling functions taking their
    documented arguments; a layer quantized in mode `quantized` (not None)
    is refused there (jax2onnx converts no Qwix kernel)."""

    def run_guarded(
        params: PyTree,
        state: PyTree,
        seed: Any,
        inputs: PyTree,
        *,
        training: bool,
        **options: Any,
    ) -> Any:
        args = (params, state, seed, inputs)
        if not converting(inputs):
            return run(*args, training=training, **options)
        if quantized is not None:
            raise NotImplementedError(onnx_quantized(layer_name, quantized))
        with _private.flax_pools_as_documented():
            check(layer_name, fn, *args, training=training)
            return run(*args, training=training, **options)

    return run_guarded


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


def check(
    layer_name: str, fn: Callable[..., Any], *args: Any, training: bool
) -> None:
    """Raises naming the operations of `fn(*args)` jax2onnx cannot convert
    (nothing where its registry cannot be read)."""
    converted_names = _private.jax2onnx_primitives()
    if converted_names is None:
        return
    closed = jax.make_jaxpr(functools.partial(fn, training=training))(*args)
    missing = sorted(set(primitives(closed.jaxpr)) - converted_names)
    if missing:
        raise NotImplementedError(onnx_unconvertible(layer_name, missing))
    if not _private.jax2onnx_lowers_nested_jit() and _jit_in_custom_rule(
        closed.jaxpr
    ):
        raise NotImplementedError(
            onnx_nested_jit(
                layer_name, metadata.version("jax2onnx"), jax.__version__
            )
        )


def onnx_unconvertible(layer_name: str, primitives: Any) -> str:
    return (
        f"Layer '{layer_name}' cannot be exported to ONNX: jax2onnx has no "
        f"conversion for the JAX operation(s) {quoted(primitives)} that "
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


_CUSTOM_RULES = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
_JITS = ("jit", "pjit")


def _jit_in_custom_rule(jaxpr: Any, inside: bool = False) -> bool:
    """Whether `jaxpr` calls a jitted function inside a function with a
    custom derivative (`jax.nn.relu` on JAX 0.12)."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if inside and name in _JITS:
            return True
        for inner in _nested(eqn):
            if _jit_in_custom_rule(inner, inside or name in _CUSTOM_RULES):
                return True
    return False


def primitives(jaxpr: Any) -> Iterator[str]:
    """The names of the primitives in `jaxpr` and the programs it nests."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for inner in _nested(eqn):
            yield from primitives(inner)


def _nested(eqn: Any) -> Iterator[Any]:
    """The programs (`Jaxpr`s) an equation's parameters hold."""
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            inner = getattr(item, "jaxpr", item)  # a ClosedJaxpr's Jaxpr
            if hasattr(inner, "eqns"):
                yield inner
