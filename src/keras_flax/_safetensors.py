"""Safetensors checkpoints by key mapping.

`load_safetensors` renames each checkpoint key to one of the layer's
weight names (its Flax path inside the layer, as the variables are named:
`Dense_0/kernel`, `blocks/0/kernel`, `batch_stats/BatchNorm_0/mean`) by
ordered rules, plans every tensor's transforms and checks every shape and
dtype kind before anything is written, then reads and assigns one tensor
at a time (under a distribution, each device's shard by slice).
`save_safetensors` writes the other way. The file format is the
`safetensors` package's.

A rule is `(regex, replacement)` or `(regex, replacement, transforms)`:
the regex must match a whole key, the replacement may use its groups
(`\\1`), and `transforms` is a dict applied in its order, of
`{"transpose": axes}`, `{"reshape": shape}`, `{"dtype": name}`. The string
`"torch"` (alone, or as an entry of the list) stands for PyTorch's
conventions, resolved against the weights the layer holds.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import types
from collections.abc import Sequence
from typing import Any
from typing import Self

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import _backends
from keras_flax import _errors
from keras_flax._model import PyTree

TRANSFORMS = ("transpose", "reshape", "dtype")

# PyTorch's `weight` is, by what the layer holds there, a kernel (Linear,
# Conv: axes moved), a norm's scale or an embedding.
_TORCH_NAMES = {
    "weight": ("kernel", "scale", "embedding", "weight"),
    "running_mean": ("mean",),
    "running_var": ("var",),
}
# PyTorch's kernel axes (out, in, *spatial) -> Flax's (*spatial, in, out).
_TORCH_KERNEL_AXES = {
    2: (1, 0),
    3: (2, 1, 0),
    4: (2, 3, 1, 0),
    5: (2, 3, 4, 1, 0),
}
# BatchNorm's step counter: no Flax counterpart.
_TORCH_DROPPED = ("num_batches_tracked",)


@dataclasses.dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern
    replacement: str
    transforms: tuple  # ((kind, argument), ...)


@dataclasses.dataclass(frozen=True)
class _Item:
    """One tensor to move: file key <-> layer weight name."""

    key: str
    name: str
    transforms: tuple
    shape: tuple  # the shape after the transforms


def load_safetensors(
    layer: keras.layers.Layer,
    filepath: str | os.PathLike,
    rules: str | list | None = None,
    strict: bool = True,
) -> dict:
    """Reads a safetensors checkpoint into a built layer's weights.

    Args:
        layer: a built `FlaxLayer` or `JaxLayer`.
        filepath: a `.safetensors` file, or the `*.safetensors.index.json`
            of a sharded checkpoint (its `weight_map` names the files).
        rules: None (keys are the layer's weight names), `"torch"`
            (PyTorch's conventions), or an ordered list of
            `(regex, replacement[, transforms])` entries and `"torch"`;
            the first entry that places a key applies.
        strict: if True, every weight of the layer must be read and every
            key placed; else those left over are reported.

    Returns:
        A dict: `missing` (weight names not in the checkpoint),
        `unexpected` (keys placed nowhere) and `converted`
        (`(key, name)` pairs read).

    Example:

    >>> import os, tempfile, torch, safetensors.torch
    >>> from flax import nnx
    >>> from keras_flax import FlaxLayer, load_safetensors
    >>> linear = torch.nn.Linear(3, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "linear.safetensors")
    >>> safetensors.torch.save_file({"fc." + k: v for k, v in
    ...     linear.state_dict().items()}, path)
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.fc = nnx.Linear(3, 2, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.fc(x)
    >>> layer = FlaxLayer(Net(nnx.Rngs(0)))
    >>> load_safetensors(layer, path, rules="torch")["converted"]
    [('fc.bias', 'fc/bias'), ('fc.weight', 'fc/kernel')]
    """
    held, shorts = _held(layer, "load_safetensors")
    rule_list = _rules(rules)
    with _Checkpoint(filepath) as checkpoint:
        items, unexpected = _plan_load(checkpoint, held, shorts, rule_list)
        missing = sorted(set(held) - {item.name for item in items})
        _check_fit(items, held, checkpoint)
        if strict and (missing or unexpected):
            raise ValueError(
                _errors.checkpoint_keys(layer.name, missing, unexpected)
            )
        for item in items:
            holder = held[item.name]
            holder.assign(_read(checkpoint, item, holder))
    if hasattr(layer, "sync_module"):
        layer.sync_module()
    return {
        "missing": missing,
        "unexpected": unexpected,
        "converted": [(item.key, item.name) for item in items],
    }


def save_safetensors(
    layer: keras.layers.Layer,
    filepath: str | os.PathLike,
    rules: str | list | None = None,
) -> None:
    """Writes a built layer's weights to a safetensors file.

    The inverse of `load_safetensors`: `rules` rename the layer's weight
    names to file keys (None: the names themselves; `"torch"`: PyTorch's
    names and axes, as `torch.nn.Module.state_dict()` has them, with a
    zero `num_batches_tracked` for each BatchNorm). RNG state is not
    written.

    Args:
        layer: a built `FlaxLayer` or `JaxLayer`.
        filepath: the `.safetensors` file to write.
        rules: None, `"torch"`, or an ordered list of
            `(regex, replacement[, transforms])` entries and `"torch"`,
            matched against the layer's weight names.
    """
    save_file = _safetensors().flax.save_file
    held, shorts = _held(layer, "save_safetensors")
    rule_list = _rules(rules)
    tensors = {}
    shorts = {full: short for short, full in shorts.items()}
    for name, holder in held.items():
        key, transforms = _place_save(name, holder, shorts, rule_list)
        if key in tensors:
            raise ValueError(_errors.checkpoint_duplicate("rules", key, name))
        value = jnp.asarray(_backends.to_jax(holder.value))
        tensors[key] = _transform(value, transforms)
    if _uses_torch(rule_list):
        tensors.update(_torch_counters(tensors))
    fmt = "pt" if _uses_torch(rule_list) else "flax"
    save_file(tensors, os.fspath(filepath), metadata={"format": fmt})


def _safetensors() -> types.ModuleType:
    """The `safetensors` package (an optional dependency)."""
    try:
        import safetensors
        import safetensors.flax
    except ImportError as error:
        raise ImportError(_errors.safetensors_missing()) from error
    return safetensors


# The layer.


def _held(layer: Any, function: str) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """The layer's weights by name, and the short names of its state (see
    `_short_names`); an unbuilt layer is refused."""
    params, state = layer._weights.by_name(layer._model.rng_state)
    if not (params or state):
        raise ValueError(_errors.checkpoint_unbuilt(function, layer.name))
    return {**params, **state}, _short_names(params, state)


def _short_names(params: PyTree, state: PyTree) -> dict[Any, Any]:
    """Short name -> name, for state in collections: a state name without
    its first part where no parameter's name starts with that part (a
    linen collection, `batch_stats/bn/mean` -> `bn/mean`), and no other
    name shortens to it or is it."""
    roots = {name.split("/", 1)[0] for name in params}
    shorts = {}
    for name in state:
        root, _, rest = name.partition("/")
        if rest and root not in roots:
            shorts.setdefault(rest, []).append(name)
    return {
        short: names[0]
        for short, names in shorts.items()
        if len(names) == 1 and short not in params and short not in state
    }


# Rules.


def _rules(rules: Any) -> list["_Rule | str"]:
    """`rules` as a list of `_Rule`s and `"torch"`; bad ones refused."""
    if rules is None:
        return []
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, (list, tuple)):
        raise TypeError(_errors.rules_not_a_list(rules))
    return [_rule(i, rule) for i, rule in enumerate(rules)]


def _rule(index: Any, rule: Any) -> "_Rule | str":
    if rule == "torch":
        return rule
    if not (isinstance(rule, (list, tuple)) and len(rule) in (2, 3)):
        raise TypeError(_errors.bad_rule(index, rule, "its form"))
    regex, replacement, *rest = rule
    try:
        pattern = re.compile(regex)
    except (re.error, TypeError) as error:
        raise ValueError(
            _errors.bad_rule(index, rule, f"its regex ({error})")
        ) from error
    transforms = rest[0] if rest else {}
    if not isinstance(transforms, dict) or set(transforms) - set(TRANSFORMS):
        raise ValueError(_errors.bad_rule(index, rule, "its transforms"))
    return _Rule(pattern, replacement, tuple(transforms.items()))


def _uses_torch(rule_list: Any) -> bool:
    return any(rule == "torch" for rule in rule_list)


def _place_load(
    key: Any,
    shape: Sequence[int],
    held: Any,
    shorts: Any,
    rule_list: Any,
) -> tuple[str, tuple[Any, ...]] | None:
    """`(name, transforms)` for a checkpoint key: the first rule placing
    it; `("", ())` for a key PyTorch's rules drop; None for none."""
    if not rule_list:
        return (key, ()) if key in held else None
    for rule in rule_list:
        if rule == "torch":
            placed = _torch_load(key, shape, held, shorts)
            if placed is not None:
                return placed
            continue
        match = rule.pattern.fullmatch(key)
        if match:
            return match.expand(rule.replacement), rule.transforms
    return None


def _torch_load(
    key: Any, shape: Sequence[int], held: Any, shorts: Any
) -> tuple[str, tuple[Any, ...]] | None:
    *module, leaf = key.split(".")
    if leaf in _TORCH_DROPPED:
        return "", ()
    prefix = "/".join(module)
    for candidate in _TORCH_NAMES.get(leaf, (leaf,)):
        path = f"{prefix}/{candidate}" if prefix else candidate
        name = path if path in held else shorts.get(path)
        if name is None:
            continue
        transforms = ()
        if candidate == "kernel" and len(shape) in _TORCH_KERNEL_AXES:
            transforms = (("transpose", _TORCH_KERNEL_AXES[len(shape)]),)
        return name, transforms
    return None


def _place_save(
    name: str, holder: Any, shorts: Any, rule_list: Any
) -> tuple[str, tuple[Any, ...]]:
    """`(key, transforms)` for a weight name; `shorts` maps names to their
    short forms (see `_short_names`)."""
    if not rule_list:
        return name, ()
    for rule in rule_list:
        if rule == "torch":
            return _torch_save(shorts.get(name, name), holder)
        match = rule.pattern.fullmatch(name)
        if match:
            return match.expand(rule.replacement), rule.transforms
    return name, ()


def _torch_save(path: str, holder: Any) -> tuple[str, tuple[Any, ...]]:
    *module, leaf = path.split("/")
    transforms = ()
    if leaf == "kernel" and len(holder.shape) in _TORCH_KERNEL_AXES:
        axes = _TORCH_KERNEL_AXES[len(holder.shape)]
        transforms = (("transpose", tuple(np.argsort(axes).tolist())),)
    leaf = {
        "kernel": "weight",
        "scale": "weight",
        "embedding": "weight",
        "mean": "running_mean",
        "var": "running_var",
    }.get(leaf, leaf)
    return ".".join([*module, leaf]), transforms


def _torch_counters(tensors: Any) -> dict[Any, Any]:
    """A zero `num_batches_tracked` beside each BatchNorm's statistics,
    as `torch.nn.BatchNorm*d.state_dict()` holds one."""
    counters = {}
    for key in tensors:
        if key.endswith("running_mean"):
            prefix = key[: -len("running_mean")]
            if prefix + "running_var" in tensors:
                counters[prefix + "num_batches_tracked"] = jnp.zeros(
                    (), jax.dtypes.canonicalize_dtype(jnp.int64)
                )
    return counters


# Planning and checks: nothing is read or written here.


def _plan_load(
    checkpoint: Any, held: Any, shorts: Any, rule_list: Any
) -> tuple[list[Any], list[Any]]:
    items, unexpected, targets = [], [], {}
    for key in checkpoint.keys():
        shape = checkpoint.shape(key)
        placed = _place_load(key, shape, held, shorts, rule_list)
        if placed is None or (placed[0] and placed[0] not in held):
            unexpected.append(
                key if placed is None else f"{key} -> {placed[0]}"
            )
            continue
        name, transforms = placed
        if not name:  # dropped by PyTorch's conventions
            continue
        if name in targets:
            raise ValueError(
                _errors.checkpoint_duplicate("filepath", targets[name], key)
            )
        targets[name] = key
        new_shape = _transformed_shape(key, shape, transforms)
        items.append(_Item(key, name, transforms, new_shape))
    return items, unexpected


def _transformed_shape(
    key: Any, shape: Sequence[int], transforms: Any
) -> tuple[int, ...]:
    for kind, argument in transforms:
        if kind == "transpose":
            axes = tuple(argument)
            if sorted(axes) != list(range(len(shape))):
                raise ValueError(
                    _errors.bad_transform(key, shape, kind, argument)
                )
            shape = tuple(shape[a] for a in axes)
        elif kind == "reshape":
            new = _reshaped(shape, tuple(argument))
            if new is None:
                raise ValueError(
                    _errors.bad_transform(key, shape, kind, argument)
                )
            shape = new
    return tuple(shape)


def _reshaped(shape: Sequence[int], target: Any) -> Any:
    """`target` with a `-1` filled in, or None where the element count
    would change."""
    size = math.prod(shape)
    known = math.prod(d for d in target if d != -1)
    if target.count(-1) > 1 or known == 0:
        return None
    if -1 in target:
        if size % known:
            return None
        target = tuple(size // known if d == -1 else d for d in target)
    return target if math.prod(target) == size else None


def _kind(dtype: Any) -> str:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if dtype == jnp.bool_:
        return "bool"
    return "integer"


def _check_fit(items: Any, held: Any, checkpoint: Any) -> None:
    """Refuses, listing them all, the tensors whose shape or dtype kind
    does not fit the weight they are read into."""
    misfits = []
    for item in items:
        holder = held[item.name]
        dtype = _target_dtype(checkpoint.dtype(item.key), item.transforms)
        shape_fits = tuple(holder.shape) == item.shape
        kind_fits = _kind(dtype) == _kind(_dtype_of(holder))
        if not (shape_fits and kind_fits):
            misfits.append(
                (
                    item.key,
                    item.name,
                    item.shape,
                    jnp.dtype(dtype).name,
                    tuple(holder.shape),
                    _dtype_of(holder).name,
                )
            )
    if misfits:
        raise ValueError(_errors.checkpoint_misfit(misfits))


def _target_dtype(dtype: Any, transforms: Any) -> Any:
    for kind, argument in transforms:
        if kind == "dtype":
            dtype = argument
    return dtype


def _dtype_of(holder: Any) -> Any:
    return jnp.dtype(keras.backend.standardize_dtype(holder.dtype))


# Reading.


def _transform(value: Any, transforms: Any) -> Any:
    for kind, argument in transforms:
        if kind == "transpose":
            value = jnp.transpose(value, tuple(argument))
        elif kind == "reshape":
            value = jnp.reshape(value, tuple(argument))
        else:
            value = value.astype(argument)
    return value


def _read(checkpoint: Any, item: Any, holder: Any) -> Any:
    """The tensor of `item`, transformed, in the holder's dtype and, for a
    variable laid out over several devices, read shard by shard."""
    dtype = _dtype_of(holder)
    sharding = _sharding(holder)
    if sharding is None:
        value = _transform(checkpoint.tensor(item.key), item.transforms)
        return _backends.initial_value(value.astype(dtype))
    by_slice = all(kind != "reshape" for kind, _ in item.transforms)

    def shard(index: Any) -> np.ndarray:
        if not by_slice:  # a reshape moves elements across slices
            whole = _transform(checkpoint.tensor(item.key), item.transforms)
            return np.asarray(whole[index].astype(dtype))
        return np.asarray(_read_slice(checkpoint, item, index).astype(dtype))

    return jax.make_array_from_callback(item.shape, sharding, shard)


def _read_slice(checkpoint: Any, item: Any, index: Any) -> Any:
    """`transform(tensor)[index]`, reading only the slice it needs."""
    axes = list(range(len(checkpoint.shape(item.key))))
    for kind, argument in item.transforms:
        if kind == "transpose":
            axes = [axes[a] for a in argument]
    # Output axis i is file axis axes[i]: slice each file axis by the index
    # of the output axis it becomes.
    file_index = [slice(None)] * len(axes)
    for out_axis, file_axis in enumerate(axes):
        file_index[file_axis] = index[out_axis]
    value = jnp.transpose(checkpoint.slice(item.key, tuple(file_index)), axes)
    return _transform(value, [t for t in item.transforms if t[0] == "dtype"])


def _sharding(holder: Any) -> Any:
    """The holder's sharding where it spans several devices, else None."""
    value = getattr(holder, "value", None)
    sharding = getattr(value, "sharding", None)
    if sharding is None or len(sharding.device_set) < 2:
        return None
    if sharding.is_fully_replicated:
        return None  # read once, laid out by `assign`
    return sharding


class _Checkpoint:
    """A safetensors file, or the files of a sharded checkpoint's index,
    opened lazily; the keys in file order."""

    def __init__(self, filepath: str | os.PathLike) -> None:
        filepath = os.fspath(filepath)
        if not os.path.isfile(filepath):
            raise FileNotFoundError(_errors.checkpoint_not_found(filepath))
        self._files = {}  # key -> file
        self._open = {}
        self._stack = contextlib.ExitStack()
        if filepath.endswith(".json"):
            self._read_index(filepath)
        else:
            self._files = dict.fromkeys(self._file(filepath).keys(), filepath)

    def _read_index(self, filepath: str) -> None:
        try:
            with open(filepath) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                _errors.checkpoint_bad_index(filepath, error)
            ) from error
        folder = os.path.dirname(filepath)
        for shard in dict.fromkeys(weight_map.values()):
            if not os.path.isfile(os.path.join(folder, shard)):
                raise FileNotFoundError(
                    _errors.checkpoint_missing_shard(filepath, shard)
                )
        self._files = {
            key: os.path.join(folder, shard)
            for key, shard in weight_map.items()
        }

    def _file(self, path: str) -> Any:
        safetensors = _safetensors()
        if path not in self._open:
            try:
                self._open[path] = self._stack.enter_context(
                    safetensors.safe_open(path, framework="flax")
                )
            except safetensors.SafetensorError as error:
                raise ValueError(
                    _errors.checkpoint_not_safetensors(path, error)
                ) from error
        return self._open[path]

    def keys(self) -> list[Any]:
        return list(self._files)

    def shape(self, key: Any) -> tuple[Any, ...]:
        return tuple(self._file(self._files[key]).get_slice(key).get_shape())

    def dtype(self, key: Any) -> str:
        name = self._file(self._files[key]).get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES[name]

    def tensor(self, key: Any) -> Any:
        return self._file(self._files[key]).get_tensor(key)

    def slice(self, key: Any, index: Any) -> Any:
        return self._file(self._files[key]).get_slice(key)[index]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
