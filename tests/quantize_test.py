"""`model.quantize(mode)` on Flax layers, against Qwix on the same module.

Ground truth is Qwix's own post-training quantization of the module with
the rules `FlaxLayer` documents (README, "Quantization"), on the layer's
float variables: `qwix.quantize_model` + `qwix.quantize_params` for linen,
`qwix.quantize_model(module, provider, x)` for NNX.
"""

import inspect
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

import keras_flax
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import _private
from keras_flax import _quantize
from keras_flax import demo
from tests.conftest import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("dot_general", "einsum")


class MLP(nn.Module):
    width: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(4)(x)


class NNXMLP(nnx.Module):
    def __init__(self, din=16, width=32, *, rngs):
        self.hidden = nnx.Linear(din, width, rngs=rngs)
        self.out = nnx.Linear(width, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


class ConvOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3))(x)


def rules(qtype, act_qtype, tile_size=None):
    """The rules `FlaxLayer` documents for a mode."""
    return [
        qwix.QuantizationRule(
            module_path=".*",
            weight_qtype=qtype,
            act_qtype=act_qtype,
            tile_size=tile_size,
            op_names=OPS,
        )
    ]


# (mode, config, the Qwix rules it means)
MODES = {
    "int8": ("int8", None, rules("int8", "int8")),
    "int8-weights": (
        None,
        keras.quantizers.Int8QuantizationConfig(activation_quantizer=None),
        rules("int8", None),
    ),
    "int4": (
        None,
        keras.quantizers.Int4QuantizationConfig(block_size=-1),
        rules("int4", None),
    ),
    "float8": ("float8", None, rules("float8_e4m3fn", "float8_e4m3fn")),
}


def linen_model(module=None, din=16, name="mlp"):
    layer = FlaxLayer(module or MLP(), seed=0, name=name)
    return keras.Sequential([keras.Input((din,)), layer]), layer


def nnx_model(din=16, width=32):
    layer = FlaxLayer.from_nnx(
        NNXMLP, din, width, rngs=nnx.Rngs(0), layer_kwargs={"name": "mlp"}
    )
    return keras.Sequential([keras.Input((din,)), layer]), layer


def qwix_linen(module, variables, qrules, x):
    quantized = qwix.quantize_model(module, qwix.PtqProvider(qrules))
    abstract = jax.eval_shape(quantized.init, jax.random.key(0), x)
    params = qwix.quantize_params(variables["params"], abstract["params"])
    # Compiled, as the layer's call is (rounding x / scale to integers may
    # differ by one between compiled and op-by-op programs).
    return np.asarray(jax.jit(quantized.apply)({"params": params}, x))


def qwix_nnx(module, qrules, x):
    module.eval()
    quantized = qwix.quantize_model(module, qwix.PtqProvider(qrules), x)
    return np.asarray(nnx.jit(lambda m, x: m(x))(quantized, x))


@pytest.mark.parametrize("case", sorted(MODES))
def test_linen_predictions_equal_qwix_and_stay_close_to_float(case):
    mode, config, qrules = MODES[case]
    model, layer = linen_model()
    x = data(8, 16, seed=1)
    variables = layer.flax_variables
    float_out = model.predict(x, verbose=0)
    model.quantize(mode, config=config)
    got = model.predict(x, verbose=0)
    np.testing.assert_allclose(
        got, qwix_linen(MLP(), variables, qrules, jnp.asarray(x)), 1e-5, 1e-5
    )
    error = np.abs(got - float_out).max() / np.abs(float_out).max()
    assert error < {"int4": 0.3, "float8": 0.2}.get(case, 0.03)


@pytest.mark.parametrize("case", sorted(MODES))
def test_nnx_predictions_equal_qwix(case):
    mode, config, qrules = MODES[case]
    model, layer = nnx_model()
    x = data(8, 16, seed=1)
    reference = NNXMLP(rngs=nnx.Rngs(0))
    model.quantize(mode, config=config)
    want = qwix_nnx(reference, qrules, jnp.asarray(x))
    np.testing.assert_allclose(model.predict(x, verbose=0), want, 1e-5, 1e-5)
    # The module is Qwix's quantized one now, holding the layer's values.
    called = nnx.jit(lambda module, x: module(x))(layer.module, jnp.asarray(x))
    np.testing.assert_allclose(called, want, 1e-5, 1e-5)


def test_quantized_weights_are_variables_of_the_quantized_dtype():
    model, layer = linen_model()
    model.quantize("int8")
    weights = {w.path.split("/", 2)[2]: w for w in layer.weights}
    assert sorted(weights) == [
        "Dense_0/bias",
        "Dense_0/kernel/array/qvalue",
        "Dense_0/kernel/array/scale",
        "Dense_1/bias",
        "Dense_1/kernel/array/qvalue",
        "Dense_1/kernel/array/scale",
    ]
    qvalue = weights["Dense_0/kernel/array/qvalue"]
    assert (qvalue.dtype, qvalue.shape, qvalue.trainable) == (
        "int8",
        (16, 32),
        False,
    )
    scale = weights["Dense_0/kernel/array/scale"]
    assert (scale.dtype, scale.shape, scale.trainable) == (
        "float32",
        (1, 32),
        False,
    )
    assert weights["Dense_0/bias"].trainable
    assert layer.quantization_mode == "int8"
    assert layer.dtype_policy.name == "int8_from_float32"
    assert layer.count_params() == 16 * 32 + 32 + 32 + 32 * 4 + 4 + 4


def _weights_bytes(model, path):
    model.save_weights(str(path))
    return os.path.getsize(path)


def test_weights_file_shrinks_with_the_weights(tmp_path):
    sizes = {}
    for mode, config in [
        ("float", None),
        ("int8", None),
        ("int4", keras.quantizers.Int4QuantizationConfig(block_size=-1)),
    ]:
        model, _ = linen_model(MLP(width=512), din=512)
        if mode != "float":
            model.quantize(mode, config=config)
        sizes[mode] = _weights_bytes(model, tmp_path / f"{mode}.weights.h5")
    # Mostly the 512x512 kernel: 1 MiB in float32.
    assert sizes["int8"] < 0.3 * sizes["float"]
    assert sizes["int4"] < 0.17 * sizes["float"]


def test_int4_is_held_packed_two_values_to_a_byte():
    model, layer = linen_model(MLP(width=31))  # an odd count of values
    x = data(4, 16)
    model.quantize(
        config=keras.quantizers.Int4QuantizationConfig(block_size=-1)
    )
    qvalue = {w.path.split("/", 2)[2]: w for w in layer.weights}[
        "Dense_0/kernel/array/qvalue"
    ]
    assert (qvalue.dtype, qvalue.shape) == ("int8", ((16 * 31 + 1) // 2,))
    assert layer.quantization_mode == "int4"
    assert layer.dtype_policy.name == "int4/-1_from_float32"
    model.predict(x, verbose=0)


@pytest.mark.parametrize("build", [linen_model, nnx_model])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_keras_file_and_weights_file_load_identical_predictions(
    build, mode, tmp_path
):
    config = None
    if mode == "int4":
        config = keras.quantizers.Int4QuantizationConfig(block_size=-1)
    model, _ = build()
    x = data(8, 16, seed=2)
    model.quantize(mode, config=config)
    want = model.predict(x, verbose=0)
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), want)
    assert loaded.layers[0].quantization_mode == mode
    # A weights file fills a model quantized alike.
    model.save_weights(str(tmp_path / "m.weights.h5"))
    other, _ = build()
    other.quantize(mode, config=config)
    other.load_weights(str(tmp_path / "m.weights.h5"))
    np.testing.assert_array_equal(other.predict(x, verbose=0), want)


@pytest.mark.slow
def test_keras_file_loads_in_a_new_process(tmp_path):
    model, _ = linen_model()
    x = data(8, 16, seed=3)
    model.quantize("int8")
    model.save(str(tmp_path / "m.keras"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    code = """
        import sys
        import numpy as np
        import keras_flax, keras
        from tests import quantize_test  # the user's model code
        folder = sys.argv[1]
        model = keras.saving.load_model(f"{folder}/m.keras")
        got = model.predict(np.load(f"{folder}/x.npy"), verbose=0)
        print(np.array_equal(got, np.load(f"{folder}/y.npy")))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.stdout.strip().splitlines()[-1:] == ["True"], result.stderr


def test_int4_block_size_is_honoured():
    # Contracted sizes 16 (blocks of 8) and 32 (blocks of 8).
    config = keras.quantizers.Int4QuantizationConfig(block_size=8)
    model, layer = linen_model()
    x = data(8, 16, seed=4)
    variables = layer.flax_variables
    model.quantize(config=config)
    want = qwix_linen(MLP(), variables, rules("int4", None, 8), jnp.asarray(x))
    np.testing.assert_allclose(model.predict(x, verbose=0), want, 1e-5, 1e-5)
    scale = {w.path.split("/", 2)[2]: w for w in layer.weights}[
        "Dense_0/kernel/array/scale"
    ]
    assert scale.shape == (2, 32)  # 16 inputs in 2 blocks
    assert layer.dtype_policy.name == "int4/8_from_float32"


def test_int4_block_larger_than_an_input_is_one_block_per_channel():
    # Keras' default block size (128) on inputs of 16 and 32: one block,
    # as `keras.layers.Dense` makes it.
    model, layer = linen_model()
    x = data(8, 16, seed=5)
    variables = layer.flax_variables
    model.quantize("int4")
    want = qwix_linen(MLP(), variables, rules("int4", None), jnp.asarray(x))
    np.testing.assert_allclose(model.predict(x, verbose=0), want, 1e-5, 1e-5)


def test_uneven_int4_blocks_are_refused_and_nothing_changes():
    model, layer = linen_model(din=12)
    before = [w.path for w in layer.weights]
    config = keras.quantizers.Int4QuantizationConfig(block_size=8)
    with pytest.raises(ValueError) as refused:
        model.quantize(config=config)
    message = str(refused.value)
    assert "'mlp'" in message and "blocks of 8" in message
    assert "params/Dense_0/kernel (contracted size 12)" in message
    assert "block_size=-1" in message
    assert [w.path for w in layer.weights] == before
    assert layer.quantization_mode is None
    model.quantize("int8")  # and it can still be quantized


def test_fit_after_quantization_trains_the_float_parameters_only():
    model, layer = linen_model()
    x, y = data(16, 16, seed=6), data(16, 4, seed=7)
    model.quantize("int8", config=MODES["int8-weights"][1])
    frozen = {w.path: np.asarray(w) for w in layer.non_trainable_weights}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert sorted(w.path.split("/", 2)[2] for w in layer.trainable_weights) == [
        "Dense_0/bias",
        "Dense_1/bias",
    ]
    for w in layer.non_trainable_weights:
        np.testing.assert_array_equal(np.asarray(w), frozen[w.path])


class LoRANet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.LoRALinear(16, 32, lora_rank=4, rngs=rngs)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_qlora_trains_adapters_on_a_quantized_base_as_qwix_and_optax_do():
    x, y = data(16, 16, seed=8), data(16, 4, seed=9)
    weights_only = MODES["int8-weights"][1]
    layer = FlaxLayer(LoRANet(nnx.Rngs(0)), wrt=nnx.LoRAParam, name="net")
    model = keras.Sequential([keras.Input((16,)), layer])
    model.quantize("int8", config=weights_only)
    base = {w.path: np.asarray(w) for w in layer.non_trainable_weights}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)

    # By hand: Qwix (the LoRA path left float) and optax.
    reference = LoRANet(nnx.Rngs(0))
    reference.eval()
    qrules = [
        qwix.QuantizationRule(module_path="hidden/lora"),
        *rules("int8", None),
    ]
    # Qwix's provider, taking JAX 0.12's `reduction_order=None` (which
    # `x @ w` passes) where Qwix does not (see the tests below).
    quantized = qwix.quantize_model(
        reference, _quantize.provider(qrules), jnp.asarray(x)
    )
    quantized.train()
    optimizer = nnx.Optimizer(quantized, optax.sgd(0.1), wrt=nnx.LoRAParam)

    def loss(module, x, y):
        return jnp.mean((module(x) - y) ** 2)

    for _ in range(3):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(
            quantized, x, y
        )
        optimizer.update(quantized, grads)

    trained = {w.path.split("/", 2)[2]: w for w in layer.trainable_weights}
    assert sorted(trained) == ["hidden/lora/lora_a", "hidden/lora/lora_b"]
    np.testing.assert_allclose(
        trained["hidden/lora/lora_b"], quantized.hidden.lora.lora_b[...], 1e-5
    )
    assert np.abs(np.asarray(trained["hidden/lora/lora_b"])).max() > 0
    for w in layer.non_trainable_weights:  # the base: bit-identical
        np.testing.assert_array_equal(np.asarray(w), base[w.path])
    np.testing.assert_allclose(
        model.predict(x, verbose=0), quantized(jnp.asarray(x)), 1e-5, 1e-5
    )


def _dot_general_taking(*names):
    """A stand-in for `jax.lax.dot_general` whose signature has `names`
    besides the first five arguments."""
    params = [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for n in ("lhs", "rhs", "dimension_numbers", "precision")
    ]
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
        for n in ("preferred_element_type", "out_sharding", *names)
    ]

    def dot_general(*args, **kwargs):
        raise AssertionError("only its signature is read")

    dot_general.__signature__ = inspect.Signature(params)
    return dot_general


class CallsDotGeneral(nnx.Module):
    """A Linear's kernel through `jax.lax.dot_general`, with `extra`
    keyword arguments."""

    def __init__(self, rngs, **extra):
        self.linear = nnx.Linear(4, 2, rngs=rngs)
        self.extra = extra

    def __call__(self, x):
        kernel = self.linear.kernel[...]
        dims = (((1,), (0,)), ((), ()))
        return jax.lax.dot_general(x, kernel, dims, **self.extra)


def test_qwix_dot_general_takes_newer_jax_arguments_left_unset(monkeypatch):
    """Where JAX's `dot_general` has arguments Qwix's lacks (JAX 0.12's
    `reduction_order` against Qwix 0.1.8), the provider takes them: None
    quantizes as Qwix's own provider does without them, a value is refused
    naming it."""
    monkeypatch.setattr(
        jax.lax, "dot_general", _dot_general_taking("reduction_order", "new")
    )
    made = _quantize.provider(rules("int8", None))
    monkeypatch.undo()
    x = jnp.asarray(data(3, 4))
    plain = qwix.quantize_model(
        CallsDotGeneral(nnx.Rngs(0)), qwix.PtqProvider(rules("int8", None)), x
    )
    taking = qwix.quantize_model(
        CallsDotGeneral(nnx.Rngs(0), new=None), made, x
    )
    np.testing.assert_array_equal(taking(x), plain(x))
    with pytest.raises(NotImplementedError, match="`new` set, which Qwix"):
        qwix.quantize_model(CallsDotGeneral(nnx.Rngs(0), new=2), made, x)


def test_qwix_dot_general_is_qwixs_own_where_it_takes_every_argument(
    monkeypatch,
):
    monkeypatch.setattr(jax.lax, "dot_general", _dot_general_taking())
    made = _quantize.provider(rules("int8", None))
    assert made.dot_general.__func__ is qwix.PtqProvider.dot_general


def test_one_call_quantizes_keras_and_flax_layers():
    layer = FlaxLayer(MLP(), seed=0, name="mlp")
    dense = keras.layers.Dense(8, name="dense")
    model = keras.Sequential([keras.Input((16,)), dense, layer])
    model.quantize("int8")
    assert dense.quantization_mode == "int8"
    assert layer.quantization_mode == "int8"
    assert dense.kernel.dtype == "int8"


def test_filters_choose_the_layers():
    layer = FlaxLayer(MLP(), seed=0, name="mlp")
    dense = keras.layers.Dense(16, name="dense")
    model = keras.Sequential([keras.Input((16,)), dense, layer])
    model.quantize("int8", filters="mlp")
    assert layer.quantization_mode == "int8"
    assert dense.quantization_mode is None


def test_digits_classifier_loses_at_most_one_point_at_int8():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = demo.load_digits_split(0)
    model = demo.build_model(0)
    model.fit(x_train, y_train, epochs=15, batch_size=32, verbose=0)
    _, float_accuracy = model.evaluate(x_test, y_test, verbose=0)
    model.quantize("int8")
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, int8_accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert float_accuracy > 0.95
    assert int8_accuracy >= float_accuracy - 0.01


def test_stablehlo_export_carries_the_integer_weights(tmp_path):
    model, _ = linen_model()
    x = data(4, 16)
    model.quantize("int8")
    exported = keras_flax.export_stablehlo(
        model, str(tmp_path / "m.hlo"), verbose=False
    )
    assert "xi8>" in exported.mlir_module()
    np.testing.assert_allclose(
        exported.call(jnp.asarray(x)), model.predict(x, verbose=0), 1e-6, 1e-6
    )


class TransformerBlock(nn.Module):
    """Pre-norm attention and MLP, with residuals."""

    @nn.compact
    def __call__(self, x):
        h = nn.SelfAttention(num_heads=2, qkv_features=16)(nn.LayerNorm()(x))
        x = x + h
        h = nn.gelu(nn.Dense(32)(nn.LayerNorm()(x)))
        return x + nn.Dense(16)(h)


@pytest.mark.slow
def test_the_stablehlo_artifact_serves_what_predict_gives(tmp_path):
    """Of a quantized Transformer block, in every mode, compiled as users
    compile (XLA's default options, in a process of its own: the tests'
    lowest optimisation level folds nothing): the artifact's weights are
    constants behind an optimization barrier, so XLA computes as `predict`
    does, activation quantization included."""
    code = """
        import os
        os.environ.pop("XLA_FLAGS", None)
        import jax
        jax.devices()  # XLA starts with its defaults, before conftest's
        import sys
        import jax.numpy as jnp
        import keras_flax, keras
        import numpy as np
        from tests import quantize_test as q
        from tests.conftest import data
        for case in sorted(q.MODES):
            mode, config, _ = q.MODES[case]
            inputs = keras.Input((8, 16))
            layer = keras_flax.FlaxLayer(q.TransformerBlock(), seed=0)
            model = keras.Model(inputs, layer(inputs))
            x = data(4, 8, 16)
            model.quantize(mode, config=config)
            exported = keras_flax.export_stablehlo(
                model, f"{sys.argv[1]}/{case}.hlo", verbose=False
            )
            served = np.asarray(exported.call(jnp.asarray(x)))
            gap = np.abs(served - model.predict(x, verbose=0)).max()
            print("gap", case, float(gap))  # (Keras 3.16 prints reports)
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [
        line.split()[1:]
        for line in result.stdout.splitlines()
        if line.startswith("gap ")
    ]
    assert len(lines) == len(MODES), result.stderr[-3000:]
    gaps = dict(lines)
    assert gaps == {case: "0.0" for case in MODES}, gaps


def test_int4_stablehlo_export_predicts_what_the_layer_does(tmp_path):
    model, _ = linen_model()
    x = data(4, 16)
    model.quantize("int4")
    exported = keras_flax.export_stablehlo(
        model, str(tmp_path / "m.hlo"), verbose=False
    )
    np.testing.assert_allclose(
        exported.call(jnp.asarray(x)), model.predict(x, verbose=0), 1e-6, 1e-6
    )


def test_onnx_export_of_a_quantized_layer_is_refused_naming_it(tmp_path):
    model, _ = linen_model()
    model.quantize("int8")
    model(data(2, 16))  # Keras exports a model that was called
    path = tmp_path / "m.onnx"
    with pytest.raises(NotImplementedError) as refused:
        model.export(str(path), format="onnx", verbose=False)
    message = str(refused.value)
    assert "Layer 'mlp'" in message and "dot_general" in message
    assert "export_stablehlo" in message
    assert not path.exists()


# Bad input.


# Keras 3.16 returns a `QuantizationReport` from `model.quantize`, with one
# summary warning; 3.14 and 3.15 warn once per layer and return None.
REPORT = getattr(keras.quantizers, "QuantizationReport", None)


def test_a_module_with_nothing_to_quantize_is_skipped_as_keras_skips():
    layer = FlaxLayer(ConvOnly(), seed=0, name="conv")
    model = keras.Sequential([keras.Input((6, 6, 1)), layer])
    before = [(w.path, w.dtype) for w in layer.weights]
    warned = "conv'" + (" .*nothing to quantize" if REPORT is None else "")
    with pytest.warns(UserWarning, match=warned):
        report = model.quantize("int8")
    if REPORT is not None:
        assert report.quantized == []
        assert report.skipped == [(layer.path, REPORT.SKIP_NO_SUPPORT)]
    assert [(w.path, w.dtype) for w in layer.weights] == before
    assert layer.quantization_mode is None
    with pytest.raises(NotImplementedError, match="`dot_general`"):
        layer.quantize("int8")


def _quantize_again(model):
    """What a second `model.quantize("int8")` does: Keras' refusal, or
    the report's skipped layers."""
    try:
        report = model.quantize("int8")
    except ValueError as refused:
        return str(refused)
    return report.skipped


def test_quantizing_twice_is_treated_as_keras_treats_dense():
    model, layer = linen_model()
    model.quantize("int8")
    dense = keras.layers.Dense(4, name="dense")
    keras_model = keras.Sequential([keras.Input((3,)), dense])
    keras_model.quantize("int8")
    if REPORT is None:  # refused
        assert "is already quantized" in _quantize_again(keras_model)
        assert "'mlp' is already quantized" in _quantize_again(model)
    else:  # skipped
        assert _quantize_again(keras_model) == [
            (dense.path, REPORT.SKIP_ALREADY_QUANTIZED)
        ]
        assert _quantize_again(model) == [
            (layer.path, REPORT.SKIP_ALREADY_QUANTIZED)
        ]
    # A layer's own `quantize` refuses on every Keras, as Dense's does.
    with pytest.raises(ValueError, match="is already quantized"):
        dense.quantize("int8")
    with pytest.raises(ValueError, match="'mlp' is already quantized"):
        layer.quantize("int8")


def test_the_quantization_report_lists_the_layers_as_keras_layers():
    layer = FlaxLayer(MLP(), seed=0, name="mlp")
    conv = FlaxLayer(ConvOnly(), seed=0, name="conv")
    dense = keras.layers.Dense(16, name="dense")
    inputs = keras.Input((16,))
    images = keras.Input((6, 6, 1))
    model = keras.Model([inputs, images], [layer(dense(inputs)), conv(images)])
    quiet = {} if REPORT is None else {"verbose": False}
    # (Qwix's own deprecation notices are recorded too, and left aside.)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = model.quantize("int8", filters="mlp|conv", **quiet)
    notices = [str(w.message) for w in caught if w.category is UserWarning]
    assert [n for n in notices if "conv'" in n], notices
    assert layer.quantization_mode == "int8"
    assert conv.quantization_mode is None
    assert dense.quantization_mode is None
    if REPORT is not None:
        assert report.mode == "int8"
        assert [(p, m) for p, m, _ in report.quantized] == [
            (layer.path, "int8")
        ]
        assert sorted(report.skipped) == sorted(
            [
                (dense.path, REPORT.SKIP_FILTERED),
                (conv.path, REPORT.SKIP_NO_SUPPORT),
            ]
        )
        summary = model.quantization_summary(verbose=False)
        assert f"Layer: {layer.path}\n" in summary
        assert "int8_from_float32" in summary
        assert f"Layer: {conv.path}" not in summary


def test_an_unknown_mode_is_refused_before_anything_changes():
    model, layer = linen_model()
    with pytest.raises(ValueError, match="Invalid quantization mode"):
        model.quantize("int3")
    assert layer.quantization_mode is None


def test_a_mode_qwix_has_no_post_training_form_of_is_not_implemented():
    _, layer = linen_model()
    config = keras.quantizers.GPTQConfig(
        dataset=["a"], tokenizer=lambda t: np.zeros((1, 4))
    )
    with pytest.raises(NotImplementedError) as refused:
        layer.quantize("gptq", config=config)
    assert "'mlp'" in str(refused.value) and "'int8'" in str(refused.value)


def test_a_custom_weight_quantizer_is_refused_naming_it():
    _, layer = linen_model()
    config = keras.quantizers.Int8QuantizationConfig(
        weight_quantizer=keras.quantizers.AbsMaxQuantizer(axis=0)
    )
    with pytest.raises(ValueError, match="`weight_quantizer`"):
        layer.quantize(config=config)
    assert layer.quantization_mode is None


def test_without_qwix_the_error_names_the_extra(monkeypatch):
    _, layer = linen_model()
    before = [w.path for w in layer.weights]
    monkeypatch.setitem(sys.modules, "qwix", None)  # import fails
    with pytest.raises(ImportError, match=r"keras-flax\[quantize\]"):
        layer.quantize("int8")
    assert [w.path for w in layer.weights] == before


def test_a_jax_layer_does_not_implement_quantization():
    layer = JaxLayer(
        lambda params, inputs: inputs @ params,
        params=np.ones((3, 2), "float32"),
    )
    keras.Sequential([keras.Input((3,)), layer])
    with pytest.raises(NotImplementedError, match="only Flax modules"):
        layer.quantize("int8")


def test_without_untrack_variable_the_float_weights_are_dropped(monkeypatch):
    monkeypatch.setattr(_private, "TRACK_VARIABLE", False)
    model, layer = linen_model()
    x = data(4, 16)
    variables = layer.flax_variables
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the InputLayer's
        model.quantize("int8")
    assert len(layer.weights) == 6
    want = qwix_linen(MLP(), variables, rules("int8", "int8"), jnp.asarray(x))
    np.testing.assert_allclose(model.predict(x, verbose=0), want, 1e-5, 1e-5)
