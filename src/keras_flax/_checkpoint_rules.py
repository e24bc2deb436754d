"""The rules of a safetensors checkpoint: how file keys become the layer's
weight names and back (`(regex, replacement[, transforms])` entries, and
PyTorch's conventions, `"torch"`), and the transforms they apply.
"""

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keras_flax._errors import describe
from keras_flax._errors import format_shape
from keras_flax._errors import short_repr

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


def rules(rules: Any) -> list["_Rule | str"]:
    """`rules` as a list of `_Rule`s and `"torch"`; bad ones refused."""
    if rules is None:
        return []
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, (list, tuple)):
        raise TypeError(rules_not_a_list(rules))
    return [_rule(i, rule) for i, rule in enumerate(rules)]


def rules_not_a_list(rules: Any) -> str:
    return (
        '`rules` must be None, "torch" or a list of rules. Received: '
        f"rules={describe(rules)}. {_RULES_FORM}"
    )


def _rule(index: Any, rule: Any) -> "_Rule | str":
    if rule == "torch":
        return rule
    if not (isinstance(rule, (list, tuple)) and len(rule) in (2, 3)):
        raise TypeError(bad_rule(index, rule, "its form"))
    regex, replacement, *rest = rule
    try:
        pattern = re.compile(regex)
    except (re.error, TypeError) as error:
        raise ValueError(
            bad_rule(index, rule, f"its regex ({error})")
        ) from error
    if not isinstance(replacement, str):
        raise TypeError(bad_rule(index, rule, "its replacement"))
    transforms = rest[0] if rest else {}
    if not isinstance(transforms, dict) or set(transforms) - set(TRANSFORMS):
        raise ValueError(bad_rule(index, rule, "its transforms"))
    checked = tuple(
        (kind, _transform_argument(index, kind, argument))
        for kind, argument in transforms.items()
    )
    return _Rule(index, pattern, replacement, checked)


def bad_rule(index: Any, rule: Any, what: str) -> str:
    return (
        f"`rules[{index}]` is not a rule: {what} does not fit. Received: "
        f"rules[{index}]={short_repr.repr(rule)}. {_RULES_FORM}"
    )


def _transform_argument(index: int, kind: str, argument: Any) -> Any:
    """A transform's argument, checked for type and value: axes (a
    permutation), a shape (ints, at most one -1), a dtype name."""
    where = f"`rules[{index}]`'s transform {{{kind!r}: ...}}"
    if kind == "dtype":
        try:
            dtype = jnp.dtype(argument) if isinstance(argument, str) else None
        except TypeError:
            dtype = None
        if dtype is None or cast_kind(dtype) == "other":
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


def uses_torch(rule_list: Any) -> bool:
    return any(rule == "torch" for rule in rule_list)


def place_load(
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


def place_save(
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


def torch_counters(tensors: Any) -> dict[Any, Any]:
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


def transformed_shape(
    key: Any, shape: Sequence[int], transforms: Any
) -> tuple[int, ...]:
    for kind, argument in transforms:
        if kind == "transpose":
            axes = tuple(argument)
            if sorted(axes) != list(range(len(shape))):
                raise ValueError(bad_transform(key, shape, kind, argument))
            shape = tuple(shape[a] for a in axes)
        elif kind == "reshape":
            new = _reshaped(shape, tuple(argument))
            if new is None:
                raise ValueError(bad_transform(key, shape, kind, argument))
            shape = new
    return tuple(shape)


def bad_transform(
    key: Any, shape: Sequence[int | None], kind: Any, argument: Any
) -> str:
    what = (
        "a permutation of its axes"
        if kind == "transpose"
        else "a shape of the same element count"
    )
    return (
        f"The rule placing key {key!r} (shape {format_shape(shape)}) asks "
        f"for {{{kind!r}: {argument!r}}}, which must be {what}. Received: "
        f"{kind}={argument!r}. Fix the rule's transforms for this key (a "
        "rule matching tensors of several ranks needs one rule per rank)."
    )


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


def transform(value: Any, transforms: Any) -> Any:
    for kind, argument in transforms:
        if kind == "transpose":
            value = jnp.transpose(value, tuple(argument))
        elif kind == "reshape":
            value = jnp.reshape(value, tuple(argument))
        else:
            value = value.astype(argument)
    return value


_RULES_FORM = (
    "Each rule is (regex, replacement) or (regex, replacement, transforms), "
    'e.g. (r"layers\\.(\\d+)\\.weight", r"blocks/\\1/kernel", '
    '{"transpose": (1, 0)}), with transforms from "transpose", "reshape", '
    '"dtype"; or the string "torch" for PyTorch\'s conventions.'
)


def cast_kind(dtype: Any) -> str:
    """`float`, `bool`, `integer` or `other`: what a cast keeps."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if dtype == jnp.bool_:
        return "bool"
    if jnp.issubdtype(dtype, jnp.integer):
        return "integer"
    return "other"
