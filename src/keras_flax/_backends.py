"""Running a layer's JAX function on the Keras backend in use.

The function is pure JAX: `fn(params, state, seed, inputs, training)` ->
`(outputs, new_state)`. How it runs depends on the backend:

- JAX: `jax.jit`, one trace per input signature.
- TensorFlow: `jax2tf.convert`, once per training mode, with a polymorphic
  batch dimension (and a symbolic size for every other unknown dimension),
  so that it runs inside Keras' `tf.function`s, `tf.GradientTape`
  differentiates it, and `model.export` serialises it.
- PyTorch: the tensors cross to JAX and back through DLPack (no copies on
  one device) inside a `torch.autograd.Function` whose forward is the
  jitted function and whose backward is its jitted `jax.vjp`.

Nothing here imports TensorFlow or PyTorch unless that backend is in use.
"""

import functools
import itertools
import string
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import _user_code
from keras_flax._errors import format_shape
from keras_flax._model import PyTree

SUPPORTED = ("jax", "tensorflow", "torch")


def name() -> str:
    return keras.backend.backend()


def make_runner(
    fn: Callable[..., Any],
    native_serialization_platforms: list[str] | None,
    layer_name: str,
) -> "_TensorFlowRunner | _TorchRunner | _JaxRunner":
    """A callable running `fn` on the current backend's tensors.

    It takes `(params, state, seed, inputs, training, spec, remat)`: lists
    of weight values (backend tensors), the seed (or None), the inputs, the
    static training flag, the `_inputs.Specs` the layer was built for and
    whether a traced call is rematerialised (JAX; `keras.RematScope`).
    """
    backend = name()
    if backend == "tensorflow":
        return _TensorFlowRunner(fn, native_serialization_platforms, layer_name)
    if backend == "torch":
        return _TorchRunner(fn)
    return _JaxRunner(fn)


def key_data(seed: Any) -> Any:
    """A Keras seed (`uint32`, or TF's `int64`, or torch's `int32`) as the
    `uint32[2]` key data that `jax.random` takes."""
    if seed is None or seed.dtype == jnp.uint32:
        return seed
    if seed.dtype == jnp.int32:  # torch: the bits of a uint32
        return jax.lax.bitcast_convert_type(seed, jnp.uint32)
    return seed.astype(jnp.uint32)


def to_jax(value: Any) -> Any:
    """A backend tensor (or variable value) as a JAX array.

    Torch tensors are shared through DLPack; TensorFlow tensors are copied
    through NumPy (used outside the compiled step only).
    """
    if isinstance(value, jax.Array):
        return value
    backend = name()
    if backend == "torch":
        import torch

        if isinstance(value, torch.Tensor):
            return _torch_to_jax(value)
    elif backend == "tensorflow":
        return jnp.asarray(keras.ops.convert_to_numpy(value))
    return jnp.asarray(value)


def own_array(value: Any, dtype: Any = None) -> Any:
    """`value` (a JAX array) for the user's object to hold, in `dtype`.

    On JAX the very array (shared with the variable: Keras replaces a
    variable's array on each update, never writes into it); a copy on
    TensorFlow and PyTorch, whose variables are written in place, and
    where the dtype differs.
    """
    if dtype is not None and value.dtype != dtype:
        return value.astype(dtype)
    if name() == "jax":
        return value
    return jnp.array(value, copy=True)


def initial_value(array: Any) -> Any:
    """A JAX array as the initial value of a variable of the backend.

    For torch, a tensor of torch's own allocation, aligned so that DLPack
    hands it to JAX without a copy.
    """
    backend = name()
    if backend == "jax":
        return array
    array = np.asarray(array)
    if backend == "torch":
        import torch

        if array.dtype == jnp.bfloat16:  # not a NumPy dtype torch knows
            return torch.from_numpy(array.astype("float32")).bfloat16()
        return torch.tensor(array)  # a copy, in torch's own allocation
    return array


def is_concrete(value: Any) -> Any:
    """Whether `value` holds numbers (not a tracer or a graph tensor)."""
    if isinstance(value, jax.core.Tracer):
        return False
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.is_symbolic_tensor(value)
    if backend == "torch":
        return getattr(getattr(value, "device", None), "type", "") != "meta"
    return True


def is_meta(inputs: PyTree) -> bool:
    """Whether `inputs` are torch "meta" tensors (shapes, no data)."""
    if name() != "torch":
        return False
    return any(
        getattr(getattr(x, "device", None), "type", "") == "meta"
        for x in jax.tree_util.tree_leaves(inputs)
    )


def meta_tensors(specs: Any) -> Any:
    """Torch "meta" tensors for a structure of Keras tensors."""
    import torch

    return jax.tree_util.tree_map(
        lambda s: torch.empty(
            s.shape, dtype=getattr(torch, s.dtype), device="meta"
        ),
        specs,
    )


def dimension_names() -> Iterator[str]:
    """Names for unknown dimensions other than the batch ("b"), without
    end: `a`, `c`, ..., `z`, `aa`, `ab`, ..., `zz`, `aaa`, ..."""
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            name = "".join(letters)
            if name != "b":
                yield name


def symbolic_structs(specs: Any, size: int | None = None) -> Any:
    """`jax.ShapeDtypeStruct`s for a structure of tensor specs (anything
    with `shape` and `dtype`: Keras tensors, `keras.InputSpec`s, arrays).

    Unknown sizes (None) become symbolic dimensions of one scope: the first
    axis of every input is the one batch dimension "b", each other unknown
    size a dimension of its own; with `size`, those others get that size.
    """
    scope = jax.export.SymbolicScope()
    names = dimension_names()

    def unknown(i: int) -> str:
        if i == 0:
            return "b"
        return next(names) if size is None else str(size)

    def symbolic(x: Any) -> Any:
        dims = [
            unknown(i) if d is None else str(d) for i, d in enumerate(x.shape)
        ]
        if all(d is not None for d in x.shape):
            shape = tuple(x.shape)
        else:
            shape = jax.export.symbolic_shape(", ".join(dims), scope=scope)
        dtype = jnp.dtype(keras.backend.standardize_dtype(x.dtype))
        return jax.ShapeDtypeStruct(shape, dtype)

    return jax.tree_util.tree_map(symbolic, specs)


def output_spec(
    fn: Callable[..., Any],
    params: PyTree,
    state: PyTree,
    seed: Any,
    inputs: PyTree,
    training: bool,
    size: int | None = None,
) -> Any:
    """Keras tensors for what `fn` returns, from shapes alone.

    `params`, `state`, `seed` and `inputs` are `jax.ShapeDtypeStruct`s or
    Keras tensors; unknown sizes become symbolic dimensions (one shared
    batch dimension) and come back as None. With `size`, unknown sizes
    other than the batch dimension are given that size instead.
    """
    inputs = symbolic_structs(inputs, size)
    outputs, _ = jax.eval_shape(
        functools.partial(fn, training=training), params, state, seed, inputs
    )

    def keras_tensor(out: Any) -> Any:
        shape = tuple(d if isinstance(d, int) else None for d in out.shape)
        return keras.KerasTensor(shape, dtype=out.dtype.name)

    return jax.tree_util.tree_map(keras_tensor, outputs)


# JAX.


class _JaxRunner:
    """Eager calls run one compiled program per input signature; under a
    trace (Keras' compiled training step) the function is traced inline,
    as any Keras layer is, rather than nested as a program of its own."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.jitted = jax.jit(fn, static_argnames="training")

    def __call__(
        self,
        params: PyTree,
        state: PyTree,
        seed: Any,
        inputs: PyTree,
        training: bool,
        spec: Any,
        remat: bool = False,
    ) -> Any:
        if any(
            isinstance(x, jax.core.Tracer)
            for x in jax.tree_util.tree_leaves(inputs)
        ):
            fn = functools.partial(self.fn, training=training)
            if remat:
                # `keras.RematScope`: recomputed in the backward pass.
                fn = jax.checkpoint(fn)
            return fn(params, state, seed, inputs)
        return self.jitted(params, state, seed, inputs, training=training)


# TensorFlow.


def polymorphic_shape(spec: Any, names: Any) -> str:
    """`jax2tf` shape text for a `Spec`: "b" for the batch dimension, a
    fresh name from `names` for each other unknown size."""
    dims = []
    for i, size in enumerate(spec.shape):
        if i == 0:
            dims.append("b")
        elif size is None:
            dims.append(next(names))
        else:
            dims.append(str(size))
    return "(" + ", ".join(dims) + ")"


class _TensorFlowRunner:
    """Runs `fn` through `jax2tf`, converted once per input structure for
    any batch size; a model that cannot take a symbolic batch size (a
    collective over the batch, as Equinox's `BatchNorm` makes) is converted
    once per batch size instead, which needs that size known."""

    def __init__(
        self, fn: Callable[..., Any], platforms: Any, layer_name: str
    ) -> None:
        self._fn = fn
        self._platforms = platforms
        self._layer_name = layer_name
        self._converted = {}
        # By `(training, treedef)`: the model's error at a symbolic batch
        # size, or None where it takes one.
        self._refused = {}

    def __call__(
        self,
        params: PyTree,
        state: PyTree,
        seed: Any,
        inputs: PyTree,
        training: bool,
        spec: Any,
        remat: bool = False,
    ) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(inputs)
        key = (training, treedef)
        if key not in self._refused:
            self._refused[key] = self._symbolic_error(
                params, state, seed, training, spec
            )
        refused = self._refused[key]
        if refused is not None:
            shapes = tuple(tuple(x.shape) for x in leaves)
            if any(d is None for shape in shapes for d in shape):
                raise ValueError(
                    tf_sizes_needed(self._layer_name, shapes, refused)
                ) from refused
            key = (*key, shapes)
        if key not in self._converted:
            self._converted[key] = self._convert(
                training, treedef, spec, refused is None
            )
        if seed is not None:
            import tensorflow as tf

            seed = tf.cast(seed, tf.uint32)
        return self._converted[key](params, state, seed, leaves)

    def _symbolic_error(
        self,
        params: PyTree,
        state: PyTree,
        seed: Any,
        training: bool,
        spec: Any,
    ) -> BaseException | None:
        """What the model raises when traced at a symbolic batch size
        (None where it takes one)."""
        traced = _user_code.attempt(
            jax.eval_shape,
            functools.partial(self._fn, training=training),
            *symbolic_structs((params, state, seed)),
            symbolic_structs(spec.tree),
        )
        if isinstance(traced, _user_code.Refused):
            return traced.error
        return None

    def _convert(
        self, training: bool, treedef: Any, spec: Any, polymorphic: bool
    ) -> Any:
        import tensorflow as tf
        from jax.experimental import jax2tf

        fn = self._fn

        def flat_fn(
            params: PyTree, state: PyTree, seed: Any, leaves: Any
        ) -> Any:
            inputs = jax.tree_util.tree_unflatten(treedef, leaves)
            return fn(params, state, seed, inputs, training=training)

        kwargs: dict[str, Any] = {}
        if polymorphic:  # else at the shapes of the first call
            names = dimension_names()
            shapes = [polymorphic_shape(s, names) for s in spec.leaves()]
            kwargs["polymorphic_shapes"] = [None, None, None, shapes]
        if self._platforms is not None:
            kwargs["native_serialization_platforms"] = tuple(self._platforms)
        converted = jax2tf.convert(flat_fn, **kwargs)
        # Traced once per input signature (eager calls included: jax2tf
        # alone would export the function again at every call); inside
        # Keras' own `tf.function`s it is inlined. AutoGraph cannot convert
        # what jax2tf returns.
        return tf.function(converted, autograph=False, reduce_retracing=True)


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


# PyTorch.


def _torch_to_jax(tensor: Any) -> Any:
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return jax.dlpack.from_dlpack(tensor)


def _jax_to_torch(array: Any) -> Any:
    import torch

    return torch.from_dlpack(array)


def _is_float(dtype: Any) -> Any:
    return jnp.issubdtype(dtype, jnp.inexact)


class _TorchRunner:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self._jitted = jax.jit(fn, static_argnames="training")
        self._forward_with_vjp = jax.jit(
            self._with_vjp, static_argnames=("treedef", "mask", "training")
        )
        self._backward = jax.jit(lambda vjp, cotangents: vjp(cotangents)[0])
        # The structure of the outputs, by `(treedef, mask, training)`.
        self._output_treedefs = {}

    def __call__(
        self,
        params: PyTree,
        state: PyTree,
        seed: Any,
        inputs: PyTree,
        training: bool,
        spec: Any,
        remat: bool = False,
    ) -> Any:
        import torch

        args = (params, state, seed, inputs)
        leaves, treedef = jax.tree_util.tree_flatten(args)
        grad_enabled = torch.is_grad_enabled()
        mask = tuple(
            grad_enabled and t.requires_grad and t.is_floating_point()
            for t in leaves
        )
        if not any(mask):  # nothing to differentiate: forward only
            arrays = [to_jax(t) for t in leaves]
            args = jax.tree_util.tree_unflatten(treedef, arrays)
            outputs = self._jitted(*args, training=training)
            return jax.tree_util.tree_map(_jax_to_torch, outputs)
        key = (treedef, mask, training)
        if key not in self._output_treedefs:
            self._output_treedefs[key] = self._output_treedef(args, training)
        flat = _torch_function().apply(self, key, *leaves)
        return jax.tree_util.tree_unflatten(self._output_treedefs[key], flat)

    def _with_vjp(
        self, diff: Any, rest: Any, treedef: Any, mask: Any, training: bool
    ) -> Any:
        """The outputs, flat, and the `vjp` of the `diff` leaves."""

        def flat_fn(diff: Any) -> Any:
            leaves = _merge(diff, rest, mask)
            args = jax.tree_util.tree_unflatten(treedef, leaves)
            outputs = self._fn(*args, training=training)
            return jax.tree_util.tree_leaves(outputs)

        return jax.vjp(flat_fn, diff)

    def _output_treedef(self, args: Any, training: bool) -> Any:
        """The structure of what `fn` returns for `args` (torch tensors),
        from their shapes alone."""

        def spec(tensor: Any) -> jax.ShapeDtypeStruct:
            dtype = keras.backend.standardize_dtype(tensor.dtype)
            return jax.ShapeDtypeStruct(tuple(tensor.shape), dtype)

        specs = jax.tree_util.tree_map(spec, args)
        fn = functools.partial(self._fn, training=training)
        return jax.tree_util.tree_structure(jax.eval_shape(fn, *specs))

    def forward(self, key: Any, tensors: Any) -> tuple[Any, Any]:
        treedef, mask, training = key
        arrays = [_torch_to_jax(t) for t in tensors]
        diff = [a for a, m in zip(arrays, mask, strict=True) if m]
        rest = [a for a, m in zip(arrays, mask, strict=True) if not m]
        flat, vjp = self._forward_with_vjp(
            diff, rest, treedef=treedef, mask=mask, training=training
        )
        return flat, vjp

    def backward(self, vjp: Any, outputs: Any, grads: Any) -> Any:
        cotangents = [
            _zeros_like(out) if g is None else _torch_to_jax(g)
            for out, g in zip(outputs, grads, strict=True)
        ]
        return self._backward(vjp, cotangents)


def _merge(diff: Any, rest: Any, mask: Any) -> list[Any]:
    diff, rest = iter(diff), iter(rest)
    return [next(diff) if m else next(rest) for m in mask]


def _zeros_like(spec: Any) -> Any:
    shape, dtype = spec
    if _is_float(dtype):
        return jnp.zeros(shape, dtype)
    return np.zeros(shape, jax.dtypes.float0)


@functools.cache
def _torch_function() -> type:
    """The `torch.autograd.Function` (torch is imported on first use)."""
    import torch

    class JaxFunction(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any, runner: Any, key: Any, *tensors: Any
        ) -> tuple[Any, ...]:
            flat, vjp = runner.forward(key, tensors)
            ctx.runner, ctx.vjp, ctx.mask = runner, vjp, key[1]
            ctx.outputs = [(a.shape, a.dtype) for a in flat]
            outputs = tuple(_jax_to_torch(a) for a in flat)
            ctx.mark_non_differentiable(
                *(
                    t
                    for t, a in zip(outputs, flat, strict=True)
                    if not _is_float(a.dtype)
                )
            )
            return outputs

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
            back = ctx.runner.backward(ctx.vjp, ctx.outputs, grads)
            back = iter(back)
            return (
                None,
                None,
                *(_jax_to_torch(next(back)) if m else None for m in ctx.mask),
            )

    return JaxFunction
