"""Safetensors checkpoints against real PyTorch modules (ground truth).

PyTorch-trained weights are saved with `safetensors.torch`, read into the
same architecture written in NNX and in linen, and the outputs compared
with PyTorch's in eval mode; the other way, `save_safetensors` writes what
`torch.nn.Module.load_state_dict(strict=True)` accepts.

Every test here is marked `torch`: where PyTorch is not installed (the
README's test command installs none) each is collected and reported as
needing it (conftest.py); CI runs them where it installs the CPU build.
"""

import gc
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import keras_flax
from keras_flax import FlaxLayer
from keras_flax import load_safetensors
from keras_flax import save_safetensors

try:
    import safetensors.torch
    import torch
except ModuleNotFoundError:  # each test is reported as needing torch
    torch = None

pytestmark = pytest.mark.torch
_Module = object if torch is None else torch.nn.Module
if torch is not None:
    torch.manual_seed(0)


# The architectures, in PyTorch, NNX and linen, named alike.


class TorchConvNet(_Module):
    """Conv2d + BatchNorm2d, global pooling, Linear + LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)
        self.norm = torch.nn.LayerNorm(5)

    def forward(self, x):  # x: NCHW
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.norm(self.fc(x))


class NNXConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.fc = nnx.Linear(4, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, epsilon=1e-5, rngs=rngs)

    def __call__(self, x):  # x: NHWC
        x = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
        return self.norm(self.fc(x))


class LinenConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
        x = nn.Conv(4, (3, 3), padding="SAME", name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=not training, epsilon=1e-5, name="bn"
        )(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.LayerNorm(epsilon=1e-5, name="norm")(
            nn.Dense(5, name="fc")(x)
        )


class TorchBlock(_Module):
    """A pre-norm transformer block (attention written out) with a token
    embedding in front."""

    def __init__(self, vocab=11, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm1 = torch.nn.LayerNorm(dim)
        self.query = torch.nn.Linear(dim, dim)
        self.key = torch.nn.Linear(dim, dim)
        self.value = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim),
            torch.nn.GELU(),
            torch.nn.Linear(2 * dim, dim),
        )

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        h = self.norm1(x)

        def split(y):
            return y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        weights = torch.softmax(
            q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1
        )
        attended = (weights @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(attended)
        return x + self.mlp(self.norm2(x))


def _attention(q, k, v, heads):
    b, t, d = q.shape

    def split(y):
        return y.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)

    q, k, v = split(q), split(k), split(v)
    weights = jax.nn.softmax(q @ k.swapaxes(-1, -2) / (d // heads) ** 0.5, -1)
    return (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, d)


class NNXBlock(nnx.Module):
    def __init__(self, rngs, vocab=11, dim=8, heads=2):
        self.heads = heads
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.mlp = nnx.List(
            [
                nnx.Linear(dim, 2 * dim, rngs=rngs),
                None,
                nnx.Linear(2 * dim, dim, rngs=rngs),
            ]
        )

    def __call__(self, ids):
        x = self.embed(ids)
        h = self.norm1(x)
        x = x + self.out(
            _attention(self.query(h), self.key(h), self.value(h), self.heads)
        )
        h = jax.nn.gelu(self.mlp[0](self.norm2(x)), approximate=False)
        return x + self.mlp[2](h)


class LinenBlock(nn.Module):
    vocab: int = 11
    dim: int = 8
    heads: int = 2

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.dim, name="embed")(ids)
        h = nn.LayerNorm(epsilon=1e-5, name="norm1")(x)
        q, k, v = (
            nn.Dense(self.dim, name=n)(h) for n in ("query", "key", "value")
        )
        x = x + nn.Dense(self.dim, name="out")(_attention(q, k, v, self.heads))
        h = nn.LayerNorm(epsilon=1e-5, name="norm2")(x)
        h = nn.Dense(2 * self.dim, name="mlp_0")(h)
        return x + nn.Dense(self.dim, name="mlp_2")(
            jax.nn.gelu(h, approximate=False)
        )


def trained_conv_net():
    """A TorchConvNet with non-trivial weights and running statistics."""
    model = TorchConvNet()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 2 + 0.5)
    return model.eval()


def conv_layer(kind):
    if kind == "nnx":
        return FlaxLayer(NNXConvNet(nnx.Rngs(1)))
    layer = FlaxLayer(LinenConvNet(), seed=1)
    layer(np.zeros((1, 6, 6, 3), "float32"))
    return layer


def block_layer(kind):
    if kind == "nnx":
        return FlaxLayer(NNXBlock(nnx.Rngs(1)))
    layer = FlaxLayer(LinenBlock(), seed=1)
    layer(np.zeros((1, 5), "int32"))
    return layer


# Linen names `mlp.0` `mlp_0`: one rule, then PyTorch's conventions.
LINEN_BLOCK_RULES = [
    (r"mlp\.(\d)\.weight", r"mlp_\1/kernel", {"transpose": (1, 0)}),
    (r"mlp\.(\d)\.bias", r"mlp_\1/bias"),
    "torch",
]


def block_rules(kind):
    return "torch" if kind == "nnx" else LINEN_BLOCK_RULES


def save_torch(model, path):
    safetensors.torch.save_file(model.state_dict(), str(path))
    return str(path)


def keras_out(layer, x):
    return np.asarray(layer(x, training=False))


def torch_out(model, x):
    """The PyTorch model's outputs in eval mode (token ids as int64)."""
    inputs = torch.from_numpy(x)
    if not inputs.is_floating_point():
        inputs = inputs.long()
    with torch.no_grad():
        return model(inputs).numpy()


def assert_predicts_as_torch(layer, model, x):
    """The layer's outputs equal PyTorch's (1e-5); images go to PyTorch as
    NCHW and to the layer as NHWC."""
    flax_x = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    np.testing.assert_allclose(
        keras_out(layer, flax_x), torch_out(model, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_torch_conv_net_loads_and_predicts_as_torch(kind, tmp_path):
    model = trained_conv_net()
    path = save_torch(model, tmp_path / "conv.safetensors")
    layer = conv_layer(kind)
    report = load_safetensors(layer, path, rules="torch")

    assert report["missing"] == [] and report["unexpected"] == []
    # Every tensor but BatchNorm's step counter, which Flax has no place for.
    assert len(report["converted"]) == len(model.state_dict()) - 1
    x = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype("float32")
    assert_predicts_as_torch(layer, model, x)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_torch_transformer_block_loads_and_predicts_as_torch(kind, tmp_path):
    model = TorchBlock().eval()
    path = save_torch(model, tmp_path / "block.safetensors")
    layer = block_layer(kind)
    load_safetensors(layer, path, rules=block_rules(kind))

    ids = np.random.default_rng(0).integers(0, 11, (3, 5)).astype("int32")
    assert_predicts_as_torch(layer, model, ids)


def test_nnx_module_holds_the_loaded_weights(tmp_path):
    model = trained_conv_net()
    layer = conv_layer("nnx")
    load_safetensors(
        layer, save_torch(model, tmp_path / "c.safetensors"), "torch"
    )
    np.testing.assert_allclose(
        layer.module.fc.kernel.get_value(),
        model.fc.weight.detach().numpy().T,
    )
    np.testing.assert_allclose(
        layer.module.bn.mean.get_value(), model.bn.running_mean.numpy()
    )


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_saved_file_loads_into_torch_strictly(kind, tmp_path):
    layer = conv_layer(kind)
    layer(np.zeros((2, 6, 6, 3), "float32"), training=True)  # move the stats
    path = str(tmp_path / "out.safetensors")
    save_safetensors(layer, path, rules="torch")

    model = TorchConvNet().eval()
    tensors = safetensors.torch.load_file(path)
    model.load_state_dict(tensors, strict=True)
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype("float32")
    assert_predicts_as_torch(layer, model, x)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_block_round_trip_through_torch(kind, tmp_path):
    layer = block_layer(kind)
    rules = (
        "torch"
        if kind == "nnx"
        else [
            (r"mlp_(\d)/kernel", r"mlp.\1.weight", {"transpose": (1, 0)}),
            (r"mlp_(\d)/bias", r"mlp.\1.bias"),
            "torch",
        ]
    )
    path = str(tmp_path / "block.safetensors")
    save_safetensors(layer, path, rules=rules)
    model = TorchBlock().eval()
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)
    ids = np.random.default_rng(2).integers(0, 11, (2, 5)).astype("int32")
    assert_predicts_as_torch(layer, model, ids)


def test_own_names_round_trip_without_rules(tmp_path):
    layer = conv_layer("linen")
    path = str(tmp_path / "own.safetensors")
    save_safetensors(layer, path)
    with safetensors.safe_open(path, "numpy") as f:
        assert sorted(f.keys()) == sorted(
            w.path.split("/", 1)[1] for w in layer.weights
        )
    other = conv_layer("linen")
    report = load_safetensors(other, path)
    assert report["missing"] == [] and report["unexpected"] == []
    x = np.ones((1, 6, 6, 3), "float32")
    np.testing.assert_array_equal(keras_out(other, x), keras_out(layer, x))


def write_sharded(model, folder):
    """The state dict in two files and their index, as Hugging Face
    writes large checkpoints."""
    state = model.state_dict()
    keys = list(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, shard_keys in shards.items():
        safetensors.torch.save_file(
            {k: state[k].contiguous() for k in shard_keys},
            os.path.join(folder, name),
        )
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return index


def test_sharded_checkpoint_through_its_index(tmp_path):
    model = TorchBlock().eval()
    index = write_sharded(model, tmp_path)
    layer = block_layer("nnx")
    report = load_safetensors(layer, index, rules="torch")
    assert len(report["converted"]) == len(model.state_dict())
    ids = np.arange(10).reshape(2, 5).astype("int32")
    assert_predicts_as_torch(layer, model, ids)


def test_rules_with_groups_and_transforms(tmp_path):
    """Keys renamed by backreference; a kernel stored flat, reshaped; a
    float16 bias cast (any float kind fits a float weight)."""
    layer = FlaxLayer(nn.Dense(3), seed=0)
    layer(np.zeros((1, 4), "float32"))
    kernel = np.arange(12, dtype="float32") / 10
    bias = np.array([1, 2, 3], "float16")
    path = str(tmp_path / "flat.safetensors")
    safetensors.numpy.save_file({"w.flat": kernel, "w.b": bias}, path)
    rules = [
        (r"(\w)\.flat", r"kernel", {"reshape": (3, 4), "transpose": (1, 0)}),
        (r"w\.b", "bias", {"dtype": "float32"}),
    ]
    load_safetensors(layer, path, rules=rules)
    np.testing.assert_allclose(
        layer.flax_variables["params"]["kernel"], kernel.reshape(3, 4).T
    )
    np.testing.assert_allclose(layer.flax_variables["params"]["bias"], bias)


def test_strict_false_reports_missing_and_unexpected(tmp_path):
    model = trained_conv_net()
    state = {
        k: v for k, v in model.state_dict().items() if not k.startswith("fc.")
    }
    state["extra.weight"] = torch.zeros(2)
    path = str(tmp_path / "partial.safetensors")
    safetensors.torch.save_file(state, path)
    layer = conv_layer("nnx")
    before = np.array(layer.module.fc.kernel.get_value())
    report = load_safetensors(layer, path, rules="torch", strict=False)
    assert report["missing"] == ["fc/bias", "fc/kernel"]
    assert report["unexpected"] == ["extra.weight"]
    np.testing.assert_array_equal(layer.module.fc.kernel.get_value(), before)
    np.testing.assert_allclose(
        layer.module.conv.bias.get_value(), model.conv.bias.detach().numpy()
    )


def weights_now(layer):
    return [np.array(w.value) for w in layer.weights]


def assert_unchanged(layer, before):
    for now, was in zip(weights_now(layer), before, strict=True):
        np.testing.assert_array_equal(now, was)


def test_strict_refuses_listing_every_missing_and_unexpected_key(tmp_path):
    state = trained_conv_net().state_dict()
    state = {k: v for k, v in state.items() if k not in ("fc.bias", "bn.bias")}
    state.update(a=torch.zeros(1), b=torch.zeros(1))
    path = str(tmp_path / "p.safetensors")
    safetensors.torch.save_file(state, path)
    layer = conv_layer("linen")
    before = weights_now(layer)
    with pytest.raises(ValueError, match="strict=True") as info:
        load_safetensors(layer, path, rules="torch")
    message = str(info.value)
    assert "Missing weights (2): bn/bias, fc/bias" in message
    assert "(2): a, b" in message and "strict=False" in message
    assert_unchanged(layer, before)
    # The fix: strict=False reads what fits.
    report = load_safetensors(layer, path, rules="torch", strict=False)
    assert report["missing"] == ["bn/bias", "fc/bias"]


def test_shape_and_dtype_misfits_are_refused_all_at_once(tmp_path):
    layer = FlaxLayer(nn.Dense(3), seed=0)
    layer(np.zeros((1, 4), "float32"))
    before = weights_now(layer)
    path = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(
        {"kernel": np.zeros((4, 5), "float32"), "bias": np.zeros(3, "int32")},
        path,
    )
    with pytest.raises(ValueError, match="Nothing was written") as info:
        load_safetensors(layer, path)
    message = str(info.value)
    assert (
        "'kernel' -> kernel: checkpoint (4, 5) float32, layer (4, 3)" in message
    )
    assert (
        "'bias' -> bias: checkpoint (3,) int32, layer (3,) float32" in message
    )
    assert_unchanged(layer, before)
    # The fix: a dtype transform for the bias, the right kernel.
    safetensors.numpy.save_file(
        {"kernel": np.ones((4, 3), "float32"), "bias": np.ones(3, "int32")},
        path,
    )
    load_safetensors(
        layer,
        path,
        rules=[("bias", "bias", {"dtype": "float32"}), (r"(.*)", r"\1")],
    )
    np.testing.assert_array_equal(layer.flax_variables["params"]["bias"], 1)


@pytest.mark.parametrize(
    "rules, error, match",
    [
        ([("(", "x")], ValueError, r"`rules\[0\]` is not a rule: its regex"),
        ([("a",)], TypeError, r"`rules\[0\]` is not a rule: its form"),
        ([("a", "b", {"flip": 0})], ValueError, "its transforms"),
        ({"a": "b"}, TypeError, "`rules` must be None"),
    ],
)
def test_bad_rules_are_refused(rules, error, match, tmp_path):
    layer = conv_layer("nnx")
    path = save_torch(trained_conv_net(), tmp_path / "c.safetensors")
    with pytest.raises(error, match=match):
        load_safetensors(layer, path, rules=rules)
    load_safetensors(layer, path, rules="torch")  # the fix


def test_two_keys_on_one_weight_are_refused(tmp_path):
    layer = FlaxLayer(nn.Dense(3), seed=0)
    layer(np.zeros((1, 4), "float32"))
    path = str(tmp_path / "two.safetensors")
    kernel = np.zeros((4, 3), "float32")
    safetensors.numpy.save_file({"a": kernel, "b": kernel}, path)
    with pytest.raises(ValueError, match="two tensors land on one place"):
        load_safetensors(layer, path, rules=[(r"a|b", "kernel")])
    load_safetensors(layer, path, rules=[("a", "kernel")], strict=False)


def test_rng_state_is_neither_written_nor_expected(tmp_path):
    class WithDropout(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.fc(x))

    layer = FlaxLayer(WithDropout(nnx.Rngs(0)))
    assert any("rngs" in w.path for w in layer.weights)
    path = str(tmp_path / "d.safetensors")
    save_safetensors(layer, path, rules="torch")
    with safetensors.safe_open(path, "numpy") as f:
        assert sorted(f.keys()) == ["fc.bias", "fc.weight"]
    torch_linear = torch.nn.Linear(4, 3)
    torch_linear.load_state_dict(
        {
            k.split(".", 1)[1]: v
            for k, v in safetensors.torch.load_file(path).items()
        },
        strict=True,
    )
    report = load_safetensors(
        FlaxLayer(WithDropout(nnx.Rngs(1))), path, "torch"
    )
    assert report["missing"] == [] and len(report["converted"]) == 2


def test_transform_changing_the_element_count_is_refused(tmp_path):
    layer = FlaxLayer(nn.Dense(3), seed=0)
    layer(np.zeros((1, 4), "float32"))
    path = str(tmp_path / "k.safetensors")
    safetensors.numpy.save_file({"k": np.zeros(12, "float32")}, path)
    rules = [("k", "kernel", {"reshape": (5, 3)})]
    with pytest.raises(
        ValueError, match=r"\{'reshape': \(5, 3\)\}.*same element count"
    ):
        load_safetensors(layer, path, rules=rules, strict=False)
    rules = [("k", "kernel", {"reshape": (4, 3), "transpose": (1,)})]
    with pytest.raises(ValueError, match="a permutation of its axes"):
        load_safetensors(layer, path, rules=rules, strict=False)
    rules = [("k", "kernel", {"reshape": (4, -1)})]
    load_safetensors(layer, path, rules=rules, strict=False)  # the fix


def test_bad_paths_are_refused(tmp_path):
    layer = conv_layer("nnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_safetensors(layer, str(tmp_path / "none.safetensors"))
    text = tmp_path / "model.safetensors"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="which safetensors cannot read"):
        load_safetensors(layer, str(text))
    index = write_sharded(trained_conv_net(), tmp_path)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(
        FileNotFoundError, match="'model-00002-of-00002.safetensors'"
    ):
        load_safetensors(layer, index, rules="torch")


def test_unbuilt_layer_is_refused_with_the_fix(tmp_path):
    layer = FlaxLayer(LinenConvNet(), seed=0)
    path = save_torch(trained_conv_net(), tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"needs a built layer.*layer\(x\)"):
        load_safetensors(layer, path, rules="torch")
    layer(np.zeros((1, 6, 6, 3), "float32"))
    load_safetensors(layer, path, rules="torch")


def test_tensors_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Live device bytes while loading stay within the layer's weights and
    the largest tensor (with its transformed copy)."""
    model = TorchBlock(vocab=20, dim=64).eval()
    path = save_torch(model, tmp_path / "big.safetensors")
    layer = FlaxLayer(NNXBlock(nnx.Rngs(0), vocab=20, dim=64))
    weights = sum(np.asarray(w.value).nbytes for w in layer.weights)
    largest = max(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )
    from keras_flax import _safetensors

    seen = []
    read = _safetensors._Checkpoint.tensor

    def tensor(self, key):
        value = read(self, key)
        seen.append(sum(a.nbytes for a in jax.live_arrays()))
        return value

    monkeypatch.setattr(_safetensors._Checkpoint, "tensor", tensor)
    gc.collect()
    base = sum(a.nbytes for a in jax.live_arrays())
    load_safetensors(layer, path, rules="torch")
    assert len(seen) == len(model.state_dict())
    assert max(seen) - base <= 2 * largest
    # Reading everything first would hold about the weights' size again.
    assert 2 * largest < weights / 2


def test_bfloat16_checkpoint_into_bfloat16_module(tmp_path):
    layer = FlaxLayer(
        nnx.Linear(4, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    assert {w.dtype for w in layer.weights} == {"bfloat16"}
    torch_linear = torch.nn.Linear(4, 3).to(torch.bfloat16)
    path = save_torch(torch_linear, tmp_path / "bf16.safetensors")
    load_safetensors(layer, path, rules="torch")
    np.testing.assert_array_equal(
        np.asarray(layer.module.kernel.get_value(), "float32"),
        torch_linear.weight.detach().float().numpy().T,
    )


def test_public_names():
    assert keras_flax.load_safetensors is load_safetensors
    assert keras_flax.save_safetensors is save_safetensors


def test_finetune_pretrained_example_round_trips_through_torch():
    import importlib.util
    import pathlib

    path = (
        pathlib.Path(__file__).parents[1]
        / "examples"
        / "finetune_pretrained.py"
    )
    spec = importlib.util.spec_from_file_location("finetune_pretrained", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    numbers = example.run(
        hidden=16, rank=2, pretrain_epochs=4, finetune_epochs=4
    )
    assert numbers["PyTorch accuracy"] > 0.8
    # The checkpoint read into the layer predicts as PyTorch does.
    assert numbers["loaded: largest logit difference to PyTorch"] < 1e-4
    assert (
        numbers["fine-tuned accuracy, shifted task"]
        > numbers["loaded accuracy, shifted task"] + 0.2
    )
    # The merged weights, back in PyTorch, predict as the Keras model.
    assert numbers["PyTorch vs Keras: largest logit difference"] < 1e-4
    assert (
        numbers["PyTorch fine-tuned accuracy, shifted task"]
        == numbers["fine-tuned accuracy, shifted task"]
    )
    # Two LoRA layers of rank 2 (64 -> 16 -> 10) train; the rest does not.
    assert numbers["trainable parameters"] == (64 + 16) * 2 + (16 + 10) * 2


class LoRANet(nnx.Module):
    """LoRA both ways NNX holds it: `LoRALinear`, and `LoRA` around a base
    module."""

    def __init__(self, rngs, lora=True):
        if lora:
            self.q = nnx.LoRALinear(4, 3, lora_rank=2, rngs=rngs)
            self.w = nnx.LoRA(
                4, 2, 3, base_module=nnx.Linear(4, 3, rngs=rngs), rngs=rngs
            )
        else:
            self.q = nnx.Linear(4, 3, rngs=rngs)
            self.w = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.q(x) + self.w(x)


class PlainNet(nnx.Module):
    """The base architecture of `LoRANet`, named as its file is."""

    def __init__(self, rngs):
        self.q = nnx.Linear(4, 3, rngs=rngs)
        self.w = nnx.Module()
        self.w.base_module = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.q(x) + self.w.base_module(x)


def _trained_lora():
    module = LoRANet(nnx.Rngs(0))
    for lora in (module.q.lora, module.w):  # adapters as after training
        lora.lora_b.set_value(jnp.full(lora.lora_b.get_value().shape, 0.3))
    return FlaxLayer(module, wrt=nnx.LoRAParam)


def test_merge_lora_writes_the_base_architectures_weights(tmp_path):
    layer = _trained_lora()
    path = str(tmp_path / "merged.safetensors")
    report = save_safetensors(layer, path, merge_lora=True)
    assert report["left_out"] == []
    assert report["written"] == [
        "q/bias",
        "q/kernel",
        "w/base_module/bias",
        "w/base_module/kernel",
    ]
    plain = FlaxLayer(PlainNet(nnx.Rngs(1)))
    load_safetensors(plain, path)  # strict: every key placed
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(
        keras_out(plain, x), keras_out(layer, x), rtol=1e-5, atol=1e-6
    )
    # Ground truth: the adapters' product added to the kernels.
    q = layer.module.q
    expected = q.kernel[...] + q.lora.lora_a[...] @ q.lora.lora_b[...]
    with safetensors.safe_open(path, "numpy") as f:
        np.testing.assert_allclose(
            f.get_tensor("q/kernel"), expected, rtol=1e-6
        )


def test_lora_adapters_are_never_silently_written_for_torch(tmp_path):
    layer = _trained_lora()
    path = str(tmp_path / "t.safetensors")
    with pytest.warns(
        UserWarning, match=r"left out the LoRA adapters.*merge_lora"
    ):
        report = save_safetensors(layer, path, rules="torch")
    assert report["left_out"] == [
        "q/lora/lora_a",
        "q/lora/lora_b",
        "w/lora_a",
        "w/lora_b",
    ]
    assert not any("lora" in key for key in report["written"])
    # Under the layer's own names they are written (and read back).
    own = save_safetensors(layer, str(tmp_path / "own.safetensors"))
    assert "q/lora/lora_a" in own["written"] and own["left_out"] == []
