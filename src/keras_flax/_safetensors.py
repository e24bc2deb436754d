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
import os
import reprlib
import stat
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_flax import _backends
from keras_flax import _checkpoint_files
from keras_flax import _checkpoint_rules
from keras_flax._checkpoint_files import Checkpoint as _Checkpoint
from keras_flax._errors import format_shape
from keras_flax._model import PyTree

_repr = reprlib.Repr()
_repr.maxlist = _repr.maxdict = 8
_repr.maxstring = 200


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

    Examples:
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
    rule_list = _checkpoint_rules.rules(rules)
    with _Checkpoint(filepath) as checkpoint:
        items, unexpected = _plan_load(checkpoint, held, shorts, rule_list)
        missing = sorted(set(held) - {item.name for item in items})
        _check_fit(items, held, checkpoint)
        if strict and (missing or unexpected):
            raise ValueError(checkpoint_keys(layer.name, missing, unexpected))
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


def checkpoint_keys(
    layer_name: str, missing: Sequence[str], unexpected: Any
) -> str:
    lines = [
        f"`filepath` does not hold exactly the weights of layer "
        f"{layer_name!r} (strict=True)."
    ]
    if missing:
        lines.append(f"Missing weights ({len(missing)}): {', '.join(missing)}.")
    if unexpected:
        lines.append(
            f"Keys placed on no weight ({len(unexpected)}): "
            f"{', '.join(unexpected)}."
        )
    lines.append(
        "Add `rules` renaming the keys to the layer's weight names "
        "(`[w.path for w in layer.weights]` without the layer name), use "
        'rules="torch" for a PyTorch checkpoint, or pass strict=False to '
        "read what fits and get the rest reported."
    )
    return " ".join(lines)


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

    Examples:
        >>> import os, tempfile, jax.numpy as jnp
        >>> from flax import nnx
        >>> from safetensors.numpy import load_file
        >>> from keras_flax import FlaxLayer
        >>> layer = FlaxLayer(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
        >>> path = os.path.join(tempfile.mkdtemp(), "linear.safetensors")
        >>> save_safetensors(layer, path, rules="torch")["written"]
        ['bias', 'weight']
        >>> load_file(path)["weight"].shape  # PyTorch's (out, in)
        (2, 3)
    """
    save_file = _checkpoint_files.library().flax.save_file
    held, shorts = _held(layer, "save_safetensors")
    rule_list = _checkpoint_rules.rules(rules)
    adapters = _lora_pairs(held)
    if merge_lora:
        for kernel, (a, b) in adapters.items():
            if kernel == a:  # no kernel of the adapters' product's shape
                _merged(held[a], held[a], held[b])  # raises, naming them
    left_out = []
    if not merge_lora and _checkpoint_rules.uses_torch(rule_list):
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
        key, transforms = _checkpoint_rules.place_save(
            name, holder, shorts, rule_list
        )
        if key in tensors:
            raise ValueError(checkpoint_duplicate("rules", key, name))
        value = jnp.asarray(_backends.to_jax(holder.value))
        if merge_lora and name in adapters:
            value = _merged(value, *(held[n] for n in adapters[name]))
        tensors[key] = _checkpoint_rules.transform(value, transforms)
    if _checkpoint_rules.uses_torch(rule_list):
        tensors.update(_checkpoint_rules.torch_counters(tensors))
    fmt = "pt" if _checkpoint_rules.uses_torch(rule_list) else "flax"
    _write_replacing(
        os.fspath(filepath),
        lambda path: save_file(tensors, path, metadata={"format": fmt}),
    )
    return {"written": sorted(tensors), "left_out": left_out}


def checkpoint_duplicate(arg: str, first: Any, second: Any) -> str:
    return (
        f"`{arg}`: two tensors land on one place, {first!r} and "
        f"{second!r}. Received: both placed at the same name. Make the "
        "rules place each key on a weight of its own."
    )


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


# The layer.


def _held(layer: Any, function: str) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """The layer's weights by name, and the short names of its state (see
    `_short_names`); an unbuilt layer is refused."""
    live = layer._model.live
    rng_state = frozenset() if live is None else live.rng_state
    params, state = layer._weights.by_name(rng_state)
    if not (params or state):
        raise ValueError(checkpoint_unbuilt(function, layer.name))
    return {**params, **state}, _short_names(params, state)


def checkpoint_unbuilt(function: str, layer_name: str) -> str:
    return (
        f"`{function}` needs a built layer: layer {layer_name!r} holds no "
        f"weights yet. Received: layer={layer_name!r} (not built). Call it "
        "on a batch first (`layer(x)`, or `model.build(input_shape)` / "
        "`keras.Input` for the model holding it)."
    )


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


# Planning and checks: nothing is read or written here.


def _plan_load(
    checkpoint: Any, held: Any, shorts: Any, rule_list: Any
) -> tuple[list[Any], list[Any]]:
    items, unexpected, targets = [], [], {}
    for key in checkpoint.keys():
        shape = checkpoint.shape(key)
        placed = _checkpoint_rules.place_load(
            key, shape, held, shorts, rule_list
        )
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
                checkpoint_duplicate("filepath", targets[name], key)
            )
        targets[name] = key
        new_shape = _checkpoint_rules.transformed_shape(key, shape, transforms)
        items.append(_Item(key, name, transforms, new_shape))
    return items, unexpected


def _check_fit(items: Any, held: Any, checkpoint: Any) -> None:
    """Refuses, listing them all, the tensors whose shape or dtype kind
    does not fit the weight they are read into."""
    misfits = []
    for item in items:
        holder = held[item.name]
        dtype = _target_dtype(checkpoint.dtype(item.key), item.transforms)
        shape_fits = tuple(holder.shape) == item.shape
        kind_fits = _checkpoint_rules.cast_kind(
            dtype
        ) == _checkpoint_rules.cast_kind(_dtype_of(holder))
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
        raise ValueError(checkpoint_misfit(misfits))


def checkpoint_misfit(misfits: Any) -> str:
    rows = "; ".join(
        f"key {key!r} -> {name}: checkpoint {format_shape(shape)} {dtype}, "
        f"layer {format_shape(held_shape)} {held_dtype}"
        for key, name, shape, dtype, held_shape, held_dtype in misfits
    )
    return (
        "`filepath` holds tensors that do not fit the weights they are "
        f"placed on (shape, or dtype kind): {rows}. Nothing was written. "
        'Give the rule a transform ({"transpose": axes}, {"reshape": '
        'shape}, {"dtype": name}), or check that the layer was built for '
        "the checkpoint's sizes."
    )


def _target_dtype(dtype: Any, transforms: Any) -> Any:
    for kind, argument in transforms:
        if kind == "dtype":
            dtype = argument
    return dtype


def _dtype_of(holder: Any) -> Any:
    return jnp.dtype(keras.backend.standardize_dtype(holder.dtype))


# Reading.


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
        value = _checkpoint_rules.transform(
            checkpoint.tensor(item.key), item.transforms
        )
        return _backends.initial_value(value.astype(dtype))
    by_slice = all(kind != "reshape" for kind, _ in item.transforms)

    def shard(index: Any) -> np.ndarray:
        # Host copies: a NumPy view would keep the slice read onto the
        # default device alive beside the shard made from it.
        if not by_slice:  # a reshape moves elements across slices
            whole = _checkpoint_rules.transform(
                checkpoint.tensor(item.key), item.transforms
            )
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
    return _checkpoint_rules.transform(
        value, [t for t in item.transforms if t[0] == "dtype"]
    )


def _sharding(holder: Any) -> Any:
    """The holder's sharding where it spans several devices, else None."""
    value = getattr(holder, "value", None)
    sharding = getattr(value, "sharding", None)
    if sharding is None or len(sharding.device_set) < 2:
        return None
    if sharding.is_fully_replicated:
        return None  # read once, laid out by `assign`
    return sharding
