"""The files of a safetensors checkpoint: one `.safetensors` file, or the
shards a `*.safetensors.index.json` names, read tensor by tensor or slice
by slice without loading the rest (`Checkpoint`).
"""

import contextlib
import json
import os
import reprlib
import stat
import types
from typing import Any
from typing import Self


class Checkpoint:
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
                    checkpoint_missing_shard(filepath, shard)
                )
            _regular_file(path, filepath)
            shards[shard] = set(self._file(path).keys())
        absent = [k for k, f in weight_map.items() if k not in shards[f]]
        if absent:
            raise ValueError(
                f"`filepath` is a sharded checkpoint's index naming "
                f"{len(absent)} key(s) that their files do not hold: "
                f"{_LIST_REPR.repr(absent)}. Received: filepath={filepath!r}. "
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
        safetensors = library()
        if path not in self._open:
            try:
                self._open[path] = self._stack.enter_context(
                    safetensors.safe_open(path, framework="flax")
                )
            except safetensors.SafetensorError as error:
                raise ValueError(
                    checkpoint_not_safetensors(path, error)
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


def checkpoint_not_safetensors(filepath: str, error: BaseException) -> str:
    return (
        f"`filepath` must be a safetensors file. Received: "
        f"filepath={filepath!r}, which safetensors cannot read ({error}). "
        "Pass a `.safetensors` file or a `*.safetensors.index.json`; a "
        "PyTorch `.bin`/`.pt` file can be converted with `torch.load` and "
        "`safetensors.torch.save_file`."
    )


def checkpoint_missing_shard(filepath: str, shard: Any) -> str:
    return (
        f"`filepath` is a sharded checkpoint's index naming the file "
        f"{shard!r}, which is not beside it. Received: filepath="
        f"{filepath!r}. Download or copy every shard the index names into "
        "its folder."
    )


def _regular_file(path: str, filepath: str) -> None:
    """Refuses a path that is missing, or not a regular file (a folder, a
    FIFO, a device such as /dev/zero)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(checkpoint_not_found(filepath)) from None
    if not stat.S_ISREG(mode):
        raise ValueError(
            "`filepath` must be a safetensors file or a sharded "
            f"checkpoint's `*.safetensors.index.json`. Received: {path!r}, "
            "which is not a regular file (a folder, a FIFO or a device). "
            "Pass the file itself."
        )


def checkpoint_not_found(filepath: str) -> str:
    return (
        "`filepath` must be a safetensors file or a sharded checkpoint's "
        f"`*.safetensors.index.json`. Received: filepath={filepath!r}, "
        "which does not exist. Check the path (a Hugging Face folder holds "
        "`model.safetensors` or `model.safetensors.index.json`)."
    )


def _weight_map(filepath: str) -> dict[str, str]:
    """The index's `weight_map`: key -> file name, both strings."""
    try:
        with open(filepath, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(checkpoint_bad_index(filepath, error)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(
            "`filepath` names a sharded checkpoint's index, which must be "
            'JSON with a "weight_map" object of key -> file name (strings).'
            f" Received: filepath={filepath!r} with weight_map="
            f"{_LIST_REPR.repr(weight_map)}. Pass the "
            "`*.safetensors.index.json` "
            "written with the shards."
        )
    return weight_map


def checkpoint_bad_index(filepath: str, error: BaseException) -> str:
    return (
        "`filepath` names a sharded checkpoint's index, which must be JSON "
        f'with a "weight_map" of key -> file. Received: filepath='
        f"{filepath!r} ({type(error).__name__}: {error}). Pass the "
        "`*.safetensors.index.json` written with the shards."
    )


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


def library() -> types.ModuleType:
    """The `safetensors` package (an optional dependency)."""
    try:
        import safetensors
        import safetensors.flax
    except ImportError as error:
        raise ImportError(safetensors_missing()) from error
    return safetensors


def safetensors_missing() -> str:
    return (
        "Reading and writing safetensors checkpoints needs the `safetensors` "
        "package, which is not installed. Install it: "
        '`pip install "keras-flax[safetensors]"` (or `pip install '
        "safetensors`)."
    )


# Lists of keys in messages.
_LIST_REPR = reprlib.Repr()
_LIST_REPR.maxlist = _LIST_REPR.maxdict = 8
_LIST_REPR.maxstring = 200
