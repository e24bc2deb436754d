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
import reprlib
import stat
import tempfile
import types
import warnings
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

_repr = reprlib.Repr()
_repr.maxlist = _repr.maxdict = 8
_repr.maxstring = 200

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
    index: int  # its place in `rules`
    pattern: re.Pattern
    replacement: str
    transforms: tuple  # ((kind, argument), ...)

    def expand(self, match: re.Match) -> str:
        """The replacement for `match`; a group it names that the regex
        lacks is refused naming the rule."""
        try:
            return match.expand(self.replacement)
        except (re.error, IndexError) as error:
            raise ValueError(
                f"`rules[{self.index}]` has the replacement "
                f"{self.replacement!r}, which refers to a group its regex "
                f"{self.pattern.pattern!r} does not have ({error}). "
                f"Received: {self.pattern.groups} group(s). Use \\1 to "
                f"\\{self.pattern.groups} or a named group of the regex."
            ) from None


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
    *,
    nonfinite: str = "warn",
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
        nonfinite: what a tensor holding NaN or infinity after its
            transforms and cast to the weight's dtype (a float64 `1e300`
            overflows float32) gets: `"warn"` (one warning naming the
            keys; the values are loaded), `"raise"` (refused before any
            weight is written; the tensors are read twice) or `"ignore"`.

    Returns:
        A dict: `missing` (weight names not in the checkpoint),
        `unexpected` (keys placed nowhere), `converted` (`(key, name)`
        pairs read), `unindexed` (keys a sharded checkpoint's files hold
        that its index does not name; not read) and `nonfinite` (keys
        read as NaN or infinity).

    Raises:
        FileNotFoundError: `filepath`, or a file its index names, is
            missing.
        ValueError: a bad path, index, rule or tensor (shape, dtype,
            keys); nothing is written then: every check is made before
            the first weight is assigned.
        TypeError: `rules` of the wrong form.

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
    if nonfinite not in ("warn", "raise", "ignore"):
        raise ValueError(
            '`nonfinite` must be "warn", "raise" or "ignore". Received: '
            f"nonfinite={nonfinite!r}."
        )
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
        if nonfinite == "raise":
            bad = [i.key for i in items if not _finite(checkpoint, i, held)]
            if bad:
                raise ValueError(_nonfinite_message(bad, "refused"))
        # Checked: from here on, only writes.
        flags = []
        for item in items:
            holder = held[item.name]
            value = _read(checkpoint, item, holder)
            if nonfinite == "warn":
                flags.append((item.key, _finite_flag(value)))
            holder.assign(value)
        bad = [key for key, finite in flags if not bool(finite)]
    if hasattr(layer, "sync_module"):
        layer.sync_module()
    if bad:
        warnings.warn(_nonfinite_message(bad, "loaded"), stacklevel=2)
    return {
        "missing": missing,
        "unexpected": unexpected,
        "converted": [(item.key, item.name) for item in items],
        "unindexed": checkpoint.unindexed,
        "nonfinite": bad,
    }


def _finite(checkpoint: Any, item: Any, held: Any) -> bool:
    """Whether `item` reads as finite values (a read that is discarded)."""
    return _all_finite(_read(checkpoint, item, held[item.name]))


def _all_finite(value: Any) -> bool:
    return bool(_finite_flag(value))


def _finite_flag(value: Any) -> Any:
    """Whether every element is finite, as a device scalar: computed
    asynchronously, read when needed (reading it at once would wait for
    each tensor in turn)."""
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        return True
    return jnp.isfinite(value).all()


def _nonfinite_message(keys: list[str], what: str) -> str:
    return (
        f"load_safetensors {what} {len(keys)} tensor(s) holding NaN or "
        "infinity after their transforms and the cast to the weight's "
        f"dtype (in the file, or overflowing that dtype): {_repr.repr(keys)}."
        ' Pass `nonfinite="raise"` to refuse such a checkpoint, '
        '`nonfinite="ignore"` to load it silently.'
    )


def save_safetensors(
    layer: keras.layers.Layer,
    filepath: str | os.PathLike,
    rules: str | list | None = None,
    *,
    merge_lora: bool = False,
) -> dict:
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
        merge_lora: if True, each LoRA adapter pair (`.../lora_a`,
            `.../lora_b`, as `nnx.LoRALinear` and `nnx.LoRA` hold them) is
            merged into the kernel it adapts (`kernel + lora_a @ lora_b`)
            and not written, so the file holds the base architecture's
            weights. If False, adapters are written under their own names,
            except under PyTorch's conventions (`"torch"`), which have no
            place for them: there they are left out, with a warning, and
            listed in the result.

    Returns:
        A dict: `written` (the file's keys) and `left_out` (weight names
        not written: LoRA adapters under `"torch"` without `merge_lora`).

    Raises:
        ValueError: two weights renamed to one key, or an adapter pair
            that `merge_lora` finds no kernel for.

    The file is written beside `filepath` under a temporary name and then
    moved onto it: an existing file is replaced whole, keeping its
    permissions, or left as it was when the save fails or is interrupted
    (no temporary file is left behind).
    """
    save_file = _safetensors().flax.save_file
    held, shorts = _held(layer, "save_safetensors")
    rule_list = _rules(rules)
    adapters = _lora_pairs(held)
    if merge_lora:
        for kernel, (a, b) in adapters.items():
            if kernel == a:  # no kernel of the adapters' product's shape
                _merged(held[a], held[a], held[b])  # raises, naming them
    left_out = []
    if not merge_lora and _uses_torch(rule_list):
        left_out = sorted(name for pair in adapters.values() for name in pair)
        if left_out:
            warnings.warn(
                f"save_safetensors left out the LoRA adapters {left_out}: "
                "PyTorch's conventions have no place for them. Pass "
                "`merge_lora=True` to merge them into their kernels (the "
                "base architecture then loads the file strictly).",
                stacklevel=2,
            )
    tensors = {}
    shorts = {full: short for short, full in shorts.items()}
    for name, holder in held.items():
        if name in left_out or (
            merge_lora and any(name in pair for pair in adapters.values())
        ):
            continue
        key, transforms = _place_save(name, holder, shorts, rule_list)
        if key in tensors:
            raise ValueError(_errors.checkpoint_duplicate("rules", key, name))
        value = jnp.asarray(_backends.to_jax(holder.value))
        if merge_lora and name in adapters:
            value = _merged(value, *(held[n] for n in adapters[name]))
        tensors[key] = _transform(value, transforms)
    if _uses_torch(rule_list):
        tensors.update(_torch_counters(tensors))
    fmt = "pt" if _uses_torch(rule_list) else "flax"
    _write_replacing(
        os.fspath(filepath),
        lambda path: save_file(tensors, path, metadata={"format": fmt}),
    )
    return {"written": sorted(tensors), "left_out": left_out}


def _lora_pairs(held: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Kernel name -> `(lora_a name, lora_b name)` of each LoRA adapter
    pair: `nnx.LoRALinear`'s (`q/lora/lora_a` adapts `q/kernel`) and
    `nnx.LoRA`'s around a base module (`w/lora_a` adapts
    `w/base_module/kernel`). A pair with no kernel of the product's shape
    maps from its own `lora_a` name (merging refuses it)."""
    pairs = {}
    for name in held:
        if not name.endswith("lora_a"):
            continue
        prefix = name[: -len("lora_a")]
        other = prefix + "lora_b"
        if other not in held:
            continue
        a, b = held[name], held[other]
        shape = (tuple(a.shape)[0], tuple(b.shape)[-1])
        parent = prefix.rstrip("/").rpartition("/")[0]
        candidates = [
            f"{parent}/kernel" if parent else "kernel",
            f"{prefix}base_module/kernel",
        ]
        kernel = next(
            (
                c
                for c in candidates
                if c in held and tuple(held[c].shape) == shape
            ),
            name,
        )
        pairs[kernel] = (name, other)
    return pairs


def _merged(kernel: Any, lora_a: Any, lora_b: Any) -> Any:
    """`kernel + lora_a @ lora_b`, in float32, in the kernel's dtype."""
    a = jnp.asarray(_backends.to_jax(lora_a.value), jnp.float32)
    b = jnp.asarray(_backends.to_jax(lora_b.value), jnp.float32)
    if kernel.shape != (a.shape[0], b.shape[-1]):
        raise ValueError(
            f"save_safetensors(merge_lora=True) found the LoRA adapters "
            f"{lora_a.path!r} and {lora_b.path!r} but no kernel of shape "
            f"{(a.shape[0], b.shape[-1])} they adapt (beside them as "
            "`kernel`, or in `base_module`). Received: a kernel of shape "
            f"{tuple(kernel.shape)}. Save without `merge_lora` (their own "
            "names), or merge them by hand."
        )
    return (kernel.astype(jnp.float32) + a @ b).astype(kernel.dtype)


def _write_replacing(filepath: str, write: Any) -> None:
    """`write(path)` into a temporary file beside `filepath`, then moved
    onto it: an existing file is replaced whole (keeping its permissions)
    or not at all; a failed or interrupted write removes the temporary
    file. A symlink at `filepath` is replaced, not followed."""
    folder = os.path.dirname(os.path.abspath(filepath))
    try:
        existing = os.lstat(filepath).st_mode
    except FileNotFoundError:
        existing = None
    if existing is not None and stat.S_ISREG(existing):
        mode = stat.S_IMODE(existing)
    else:  # a new file (or a symlink, replaced): the umask's mode
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    descriptor, temporary = tempfile.mkstemp(
        dir=folder, prefix=f".{os.path.basename(filepath)}.", suffix=".tmp"
    )
    os.close(descriptor)
    try:
        write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, filepath)
    except BaseException:  # KeyboardInterrupt too: no debris either way
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


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
    live = layer._model.live
    rng_state = frozenset() if live is None else live.rng_state
    params, state = layer._weights.by_name(rng_state)
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
    if not isinstance(replacement, str):
        raise TypeError(_errors.bad_rule(index, rule, "its replacement"))
    transforms = rest[0] if rest else {}
    if not isinstance(transforms, dict) or set(transforms) - set(TRANSFORMS):
        raise ValueError(_errors.bad_rule(index, rule, "its transforms"))
    checked = tuple(
        (kind, _transform_argument(index, kind, argument))
        for kind, argument in transforms.items()
    )
    return _Rule(index, pattern, replacement, checked)


def _transform_argument(index: int, kind: str, argument: Any) -> Any:
    """A transform's argument, checked for type and value: axes (a
    permutation), a shape (ints, at most one -1), a dtype name."""
    where = f"`rules[{index}]`'s transform {{{kind!r}: ...}}"
    if kind == "dtype":
        try:
            dtype = jnp.dtype(argument) if isinstance(argument, str) else None
        except TypeError:
            dtype = None
        if dtype is None or _kind(dtype) == "other":
            raise ValueError(
                f"{where} must name a numeric dtype ('float32', 'bfloat16', "
                f"'int8', ...). Received: {argument!r}. Fix the rule."
            )
        return dtype.name
    ints = isinstance(argument, (list, tuple)) and all(
        isinstance(a, int) and not isinstance(a, bool) for a in argument
    )
    if not ints:
        raise TypeError(
            f"{where} must be a list of ints. Received: {argument!r} (of "
            f"{type(argument).__name__}). Fix the rule, e.g. "
            f"{{{kind!r}: {[1, 0] if kind == 'transpose' else [4, -1]}}}."
        )
    argument = tuple(argument)
    if kind == "transpose" and sorted(argument) != list(range(len(argument))):
        raise ValueError(
            f"{where} must be a permutation of its axes (each of 0..n-1 "
            "once). Received: "
            f"{list(argument)}. Fix the rule."
        )
    if kind == "reshape" and (
        any(a < -1 for a in argument) or argument.count(-1) > 1
    ):
        raise ValueError(
            f"{where} must be a shape of sizes >= 0, at most one of them -1 "
            f"(inferred). Received: {list(argument)}. Fix the rule."
        )
    return argument


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
            return rule.expand(match), rule.transforms
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
            return rule.expand(match), rule.transforms
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
    if jnp.issubdtype(dtype, jnp.integer):
        return "integer"
    return "other"


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
    variable laid out over several devices, read shard by shard. A value
    overflowing the dtype becomes infinity (found by `_all_finite`)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _read_cast(checkpoint, item, holder)


def _read_cast(checkpoint: Any, item: Any, holder: Any) -> Any:
    dtype = _dtype_of(holder)
    sharding = _sharding(holder)
    if sharding is None:
        value = _transform(checkpoint.tensor(item.key), item.transforms)
        return _backends.initial_value(value.astype(dtype))
    by_slice = all(kind != "reshape" for kind, _ in item.transforms)

    def shard(index: Any) -> np.ndarray:
        # Host copies: a NumPy view would keep the slice read onto the
        # default device alive beside the shard made from it.
        if not by_slice:  # a reshape moves elements across slices
            whole = _transform(checkpoint.tensor(item.key), item.transforms)
            return np.array(whole[index].astype(dtype), copy=True)
        value = _read_slice(checkpoint, item, index).astype(dtype)
        return np.array(value, copy=True)

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
    opened lazily; the keys in file order.

    Everything is checked when it is opened, before a tensor is read: the
    path is a regular file, the index is JSON whose `weight_map` maps keys
    to plain file names inside the index's folder (no `..`, no absolute
    path, no symlink leaving the folder; one message whether or not such a
    target exists), and each key the index names is in its file.
    """

    def __init__(self, filepath: str | os.PathLike) -> None:
        filepath = os.fspath(filepath)
        _regular_file(filepath, filepath)
        self._files = {}  # key -> file
        self._open = {}
        self._stack = contextlib.ExitStack()
        self.unindexed = []  # keys of the shards the index does not name
        if filepath.endswith(".json"):
            self._read_index(filepath)
        else:
            self._files = dict.fromkeys(self._file(filepath).keys(), filepath)

    def _read_index(self, filepath: str) -> None:
        weight_map = _weight_map(filepath)
        folder = os.path.realpath(os.path.dirname(filepath))
        shards = {}
        for shard in dict.fromkeys(weight_map.values()):
            path = os.path.join(folder, shard)
            plain = shard not in ("", ".", "..") and not any(
                sep in shard for sep in ("/", "\\", os.sep)
            )
            inside = os.path.dirname(os.path.realpath(path)) == folder
            if not (plain and inside):
                raise ValueError(
                    f"`filepath` is a sharded checkpoint's index whose "
                    f"weight_map names {shard!r}, which is not a file name "
                    "inside the index's folder: an index names its shards "
                    "by plain file name (no folder, no '..', no absolute "
                    "path, no symlink out of the folder). Received: "
                    f"filepath={filepath!r}. Use the index written with the "
                    "shards, or fix its weight_map."
                )
            if not os.path.lexists(path):
                raise FileNotFoundError(
                    _errors.checkpoint_missing_shard(filepath, shard)
                )
            _regular_file(path, filepath)
            shards[shard] = set(self._file(path).keys())
        absent = [k for k, f in weight_map.items() if k not in shards[f]]
        if absent:
            raise ValueError(
                f"`filepath` is a sharded checkpoint's index naming "
                f"{len(absent)} key(s) that their files do not hold: "
                f"{_repr.repr(absent)}. Received: filepath={filepath!r}. "
                "Use the index written with these shards."
            )
        named = set(weight_map)
        self.unindexed = sorted(
            key for keys in shards.values() for key in keys - named
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
        if name not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"`filepath` holds the tensor {key!r} of dtype {name}, which "
                "a Flax or JAX weight cannot take. Received: dtype="
                f"{name}; supported: {', '.join(_SAFETENSORS_DTYPES)}. "
                "Convert the tensor before saving, or leave its key out "
                "(`strict=False` reports it)."
            )
        return _SAFETENSORS_DTYPES[name]

    def tensor(self, key: Any) -> Any:
        return self._file(self._files[key]).get_tensor(key)

    def slice(self, key: Any, index: Any) -> Any:
        return self._file(self._files[key]).get_slice(key)[index]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def _regular_file(path: str, filepath: str) -> None:
    """Refuses a path that is missing, or not a regular file (a folder, a
    FIFO, a device such as /dev/zero)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(
            _errors.checkpoint_not_found(filepath)
        ) from None
    if not stat.S_ISREG(mode):
        raise ValueError(
            "`filepath` must be a safetensors file or a sharded "
            f"checkpoint's `*.safetensors.index.json`. Received: {path!r}, "
            "which is not a regular file (a folder, a FIFO or a device). "
            "Pass the file itself."
        )


def _weight_map(filepath: str) -> dict[str, str]:
    """The index's `weight_map`: key -> file name, both strings."""
    try:
        with open(filepath, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(
            _errors.checkpoint_bad_index(filepath, error)
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(
            "`filepath` names a sharded checkpoint's index, which must be "
            'JSON with a "weight_map" object of key -> file name (strings).'
            f" Received: filepath={filepath!r} with weight_map="
            f"{_repr.repr(weight_map)}. Pass the `*.safetensors.index.json` "
            "written with the shards."
        )
    return weight_map


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
