"""Checkpoints as untrusted input: every bad file, index or rule is refused
with one clear error before anything is written (the layer's values stay
bit for bit), an index reads only its own folder, and saving leaves no
debris."""

import json
import os
import stat
import struct
import warnings

import equinox as eqx
import jax
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy
from flax import nnx

from keras_flax import EquinoxLayer
from keras_flax import FlaxLayer
from keras_flax import _serialization
from keras_flax import load_safetensors
from keras_flax import save_safetensors


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def _layer(seed=0):
    return FlaxLayer(Net(nnx.Rngs(seed)))


def _values(layer):
    return {w.path: np.array(w.numpy()) for w in layer.weights}


def _assert_unchanged(layer, before):
    after = _values(layer)
    assert after.keys() == before.keys()
    for path, value in before.items():
        assert after[path].tobytes() == value.tobytes(), path


def _tensors(seed=1):
    """A checkpoint of the layer's own names, with other values."""
    layer = _layer(seed)
    return {w.path.split("/", 1)[1]: np.array(w.numpy()) for w in layer.weights}


def _write(path, tensors):
    safetensors.numpy.save_file(tensors, str(path))
    return str(path)


def _sharded(folder, tensors, weight_map=None):
    """Two shards and their index (its `weight_map` replaced if given)."""
    keys = sorted(tensors)
    names = {"a.safetensors": keys[:2], "b.safetensors": keys[2:]}
    found = {}
    for name, shard_keys in names.items():
        _write(folder / name, {k: tensors[k] for k in shard_keys})
        found.update(dict.fromkeys(shard_keys, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map or found}))
    return str(index)


def _refused(layer, error, match, *args, **kwargs):
    before = _values(layer)
    with pytest.raises(error, match=match):
        load_safetensors(layer, *args, **kwargs)
    _assert_unchanged(layer, before)


# Index paths: a weight_map names files inside the index's folder only.


def _outside(tmp_path):
    """A folder with a checkpoint, and a folder beside it (the secret)."""
    inside = tmp_path / "ckpt"
    outside = tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    _write(outside / "secret.safetensors", _tensors(2))
    return inside, outside


@pytest.mark.parametrize(
    "target",
    ["../outside/secret.safetensors", "ABSOLUTE", "link.safetensors"],
)
def test_an_index_never_reads_outside_its_folder(target, tmp_path):
    inside, outside = _outside(tmp_path)
    if target == "ABSOLUTE":
        target = str(outside / "secret.safetensors")
    if target == "link.safetensors":
        os.symlink(outside / "secret.safetensors", inside / target)
    tensors = _tensors()
    weight_map = dict.fromkeys(tensors, target)
    index = _sharded(inside, tensors, weight_map)
    _refused(
        _layer(),
        ValueError,
        "not a file name inside the index's folder",
        index,
    )


def test_an_index_refusal_does_not_tell_whether_the_target_exists(tmp_path):
    inside, _ = _outside(tmp_path)
    tensors = _tensors()
    messages = []
    for target in ("../outside/secret.safetensors", "../outside/none"):
        index = _sharded(inside, tensors, dict.fromkeys(tensors, target))
        with pytest.raises(ValueError) as refused:
            load_safetensors(_layer(), index)
        messages.append(str(refused.value).replace(target, "<target>"))
    assert messages[0] == messages[1]


def test_a_symlink_inside_the_folder_is_followed(tmp_path):
    tensors = _tensors()
    index = _sharded(tmp_path, tensors)
    os.rename(tmp_path / "b.safetensors", tmp_path / "real-b.safetensors")
    os.symlink("real-b.safetensors", tmp_path / "b.safetensors")
    layer = _layer()
    load_safetensors(layer, index)
    assert sorted(_values(layer)) == sorted(
        f"{layer.name}/{k}" for k in tensors
    )
    for key, value in tensors.items():
        np.testing.assert_array_equal(
            _values(layer)[f"{layer.name}/{key}"], value
        )


# Bad indexes and files: one ValueError each, nothing changed.


@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"weight_map": ["a.safetensors"]}).encode(),
        json.dumps({"weight_map": 3}).encode(),
        json.dumps({"weight_map": None}).encode(),
        json.dumps({"weight_map": {"fc1.kernel": 3}}).encode(),
        json.dumps([1, 2]).encode(),
        b"\xff\xfe not utf-8",
        b"[" * 100_000 + b"]" * 100_000,
        b"{not json",
    ],
    ids=[
        "list",
        "int",
        "null",
        "file-not-a-string",
        "not-an-object",
        "not-utf8",
        "deep",
        "not-json",
    ],
)
def test_a_malformed_index_is_one_value_error(content, tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(content)
    _refused(_layer(), ValueError, "index", str(index))


def test_an_index_key_its_file_lacks_is_refused(tmp_path):
    tensors = _tensors()
    weight_map = dict.fromkeys(tensors, "a.safetensors")
    index = _sharded(tmp_path, tensors, weight_map)
    _refused(_layer(), ValueError, "key.*that their files do not hold", index)


def test_keys_of_a_shard_its_index_does_not_name_are_reported(tmp_path):
    tensors = _tensors()
    index = _sharded(tmp_path, tensors)
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    _write(
        tmp_path / "b.safetensors",
        {
            **{
                k: tensors[k]
                for k, f in weight_map.items()
                if f == "b.safetensors"
            },
            "extra": np.zeros(2, "float32"),
        },
    )
    report = load_safetensors(_layer(), index)
    assert report["unindexed"] == ["extra"]


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_a_path_that_is_not_a_regular_file_is_refused(kind, tmp_path):
    path = tmp_path / "model.safetensors"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path = "/dev/zero"
    _refused(_layer(), ValueError, "not a regular file", str(path))


def _raw_safetensors(path, dtype, shape, data):
    """A safetensors file written by hand (any dtype name)."""
    header = json.dumps(
        {
            "fc1/bias": {
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [0, len(data)],
            }
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize("dtype", ["C64", "F8_E8M0"])
def test_a_dtype_no_weight_can_take_is_one_value_error(dtype, tmp_path):
    size = {"C64": 8, "F8_E8M0": 1}[dtype]
    path = _raw_safetensors(
        tmp_path / "m.safetensors", dtype, [8], bytes(8 * size)
    )
    _refused(_layer(), ValueError, dtype, path, strict=False)


# Rules: every transform argument checked before any tensor is read.


@pytest.mark.parametrize(
    "transforms, error, match",
    [
        ({"reshape": [4.0, 2.0]}, TypeError, "list of ints"),
        ({"reshape": [True, 8]}, TypeError, "list of ints"),
        ({"reshape": [-1, -1]}, ValueError, "at most one of them -1"),
        ({"reshape": [-2, 16]}, ValueError, "sizes >= 0"),
        ({"transpose": [0, 0]}, ValueError, "a permutation"),
        ({"transpose": [-1, 0]}, ValueError, "a permutation"),
        ({"transpose": "10"}, TypeError, "list of ints"),
        ({"dtype": "bogus"}, ValueError, "numeric dtype"),
        ({"dtype": 3}, ValueError, "numeric dtype"),
        ({"dtype": "complex64"}, ValueError, "numeric dtype"),
    ],
)
def test_a_bad_transform_is_refused_before_any_write(
    transforms, error, match, tmp_path
):
    path = _write(tmp_path / "m.safetensors", _tensors())
    rules = [(r"fc2/kernel", "fc2/kernel", transforms), (r"(.*)", r"\1")]
    _refused(_layer(), error, match, path, rules=rules)


def test_a_replacement_naming_a_missing_group_is_refused(tmp_path):
    path = _write(tmp_path / "m.safetensors", _tensors())
    rules = [(r"fc(\d)/(.*)", r"fc\9/\2")]
    _refused(_layer(), ValueError, r"rules\[0\].*group", path, rules=rules)


def test_a_reshape_that_used_to_fail_midway_changes_nothing(tmp_path):
    """The reported case: `fc1/bias` was assigned before the reshape of
    a later tensor failed."""
    path = _write(tmp_path / "m.safetensors", _tensors())
    rules = [
        ("fc2/kernel", "fc2/kernel", {"reshape": [4.0, 4.0]}),
        ("(.*)", r"\1"),
    ]
    _refused(_layer(), TypeError, "list of ints", path, rules=rules)


# Values: non-finite tensors and overflowing casts.


def test_nonfinite_tensors_warn_naming_them_or_are_refused(tmp_path):
    tensors = _tensors()
    tensors["fc1/bias"] = tensors["fc1/bias"].copy()
    tensors["fc1/bias"][0] = np.nan
    tensors["fc2/bias"] = np.array([1e300, 0.0])  # float64 -> float32: inf
    path = _write(tmp_path / "m.safetensors", tensors)
    _refused(
        _layer(), ValueError, "fc1/bias.*fc2/bias", path, nonfinite="raise"
    )
    layer = _layer()
    with pytest.warns(
        UserWarning, match=r"2 tensor\(s\).*'fc1/bias', 'fc2/bias'"
    ):
        report = load_safetensors(layer, path)
    assert report["nonfinite"] == ["fc1/bias", "fc2/bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_safetensors(_layer(), path, nonfinite="ignore")
    with pytest.raises(ValueError, match="`nonfinite` must be"):
        load_safetensors(_layer(), path, nonfinite="no")


def test_a_finite_checkpoint_loads_as_plain_safetensors_reads_it(tmp_path):
    tensors = _tensors()
    path = _write(tmp_path / "m.safetensors", tensors)
    layer = _layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_safetensors(layer, path)
    assert report["nonfinite"] == [] and report["unindexed"] == []
    for key, value in safetensors.numpy.load_file(path).items():
        np.testing.assert_array_equal(
            _values(layer)[f"{layer.name}/{key}"], value
        )


# Saving: no debris, the existing file's mode kept.


def test_an_interrupted_save_leaves_the_old_file_and_no_debris(
    tmp_path, monkeypatch
):
    layer = _layer()
    target = tmp_path / "m.safetensors"
    save_safetensors(layer, target)
    os.chmod(target, 0o644)
    good = target.read_bytes()

    def interrupted(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.flax, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(_layer(1), target)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert target.read_bytes() == good
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


def test_a_save_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    target = tmp_path / "m.safetensors"
    save_safetensors(_layer(), target)
    os.chmod(target, 0o640)
    save_safetensors(_layer(1), target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert os.listdir(tmp_path) == ["m.safetensors"]
    saved = safetensors.numpy.load_file(str(target))
    for key, value in _tensors(1).items():
        np.testing.assert_array_equal(saved[key], value)


def test_a_save_replaces_a_symlink_and_leaves_its_target(tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"keep")
    link = tmp_path / "m.safetensors"
    os.symlink(elsewhere, link)
    save_safetensors(_layer(), link)
    assert not os.path.islink(link) and elsewhere.read_bytes() == b"keep"


# Equinox and configs: refused with the fix, not a raw error.


KEY = jax.random.PRNGKey(0)


def test_equinox_refuses_input_dim_naming_from_nnx():
    with pytest.raises(TypeError, match="FlaxLayer.from_nnx.*Pass the size"):
        EquinoxLayer.from_constructor(
            eqx.nn.Linear, FlaxLayer.input_dim(), 2, key=KEY
        )


def test_equinox_refuses_a_state_of_the_wrong_kind():
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", mode="batch"
    )
    with pytest.raises(TypeError, match=r"`state` must be the `eqx.nn.State`"):
        EquinoxLayer(bn, state={"mean": 0})
    linear = eqx.nn.Linear(3, 2, key=KEY)
    with pytest.raises(ValueError, match="takes no `state` argument"):
        EquinoxLayer(linear, state=state)


def test_equinox_refuses_the_state_of_another_module():
    class Two(eqx.Module):
        bn: eqx.nn.BatchNorm

        def __init__(self):
            self.bn = eqx.nn.BatchNorm(3, "batch", mode="batch")

        def __call__(self, x, state):
            return self.bn(x, state)

    two, _ = eqx.nn.make_with_state(Two)()
    linear = eqx.nn.Linear(3, 2, key=KEY)
    # A state with no entry for `Two`'s index: a module without state.
    _, other = eqx.nn.make_with_state(eqx.nn.Linear)(3, 2, key=KEY)
    with pytest.raises(ValueError, match="must hold the state"):
        EquinoxLayer(two, state=other)
    assert linear is not None


def test_a_config_input_dim_without_its_axis_is_refused():
    with pytest.raises(ValueError, match="placeholder without its axis"):
        _serialization.deserialize_value(
            {"__keras_flax__": "input_dim"}, "args"
        )
