"""Saving: `.keras` round trips in a new process, refusals, and safety."""

import functools
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import flax.linen as nn
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from tests import modules
from tests import nnx_modules
from tests.conftest import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _functional(layer, shape, dtype="float32"):
    inputs = keras.Input(shape, dtype=dtype)
    return keras.Model(inputs, layer(inputs))


def _trained(model, shape, out):
    model.compile("adam", "mse")
    model.fit(data(32, *shape), data(32, out, seed=1), epochs=1, verbose=0)
    return model


def _cases():
    configured = modules.Configured(
        features=6,
        act=nn.gelu,
        dtype=jnp.bfloat16,
        kernel_init=nn.initializers.normal(0.02),
        norm=functools.partial(nn.BatchNorm, momentum=0.9),
        head=modules.MLP(features=(5, 2)),
        sizes=(4, 3),
    )
    mlp = modules.MLP()
    return {
        "docs-cnn": (
            _functional(FlaxLayer(modules.CNN(), seed=0), (8, 8, 1)),
            (8, 8, 1),
        ),
        "token-ids": (
            _functional(
                FlaxLayer(modules.Embedder(), seed=0), (10,), dtype="int32"
            ),
            (10,),
        ),
        "fields": (
            _trained(_functional(FlaxLayer(configured, seed=0), (5,)), (5,), 2),
            (5,),
        ),
        "zeros-init": (
            _functional(
                FlaxLayer(nn.Dense(3, bias_init=nn.initializers.zeros_init())),
                (4,),
            ),
            (4,),
        ),
        "batchnorm": (
            _trained(
                _functional(
                    FlaxLayer(modules.BatchNormDropout(), seed=0), (5,)
                ),
                (5,),
                2,
            ),
            (5,),
        ),
        "method-name": (
            _functional(FlaxLayer(mlp, method="encode", seed=0), (6,)),
            (6,),
        ),
        "method-bound": (
            _functional(FlaxLayer(mlp, method=mlp.encode, seed=0), (6,)),
            (6,),
        ),
        "method-function": (
            _functional(
                FlaxLayer(mlp, method=modules.encode_wrapper, seed=0), (6,)
            ),
            (6,),
        ),
        "own-config": (
            _functional(FlaxLayer(modules.WithOwnConfig((4, 2)), seed=0), (3,)),
            (3,),
        ),
        "jax-layer": (
            _trained(
                _functional(
                    JaxLayer(
                        modules.stateful_call,
                        modules.stateful_init_importable,
                        seed=0,
                    ),
                    (5,),
                ),
                (5,),
                3,
            ),
            (5,),
        ),
        "nnx-from-nnx": (
            _trained(
                _functional(
                    FlaxLayer.from_nnx(
                        nnx_modules.ConvBatchNormDropout, rngs=nnx.Rngs(3)
                    ),
                    (6, 6, 1),
                ),
                (6, 6, 1),
                3,
            ),
            (6, 6, 1),
        ),
        "nnx-own-config": (
            _trained(
                _functional(
                    FlaxLayer(nnx_modules.Configurable(3, rngs=nnx.Rngs(1))),
                    (4,),
                ),
                (4,),
                3,
            ),
            (4,),
        ),
    }


LOADER = """
import json, sys
import numpy as np
import keras_flax, keras
from tests import modules, nnx_modules  # the user's model code
folder = sys.argv[1]
results = {}
for name in json.load(open(f"{folder}/cases.json")):
    try:
        model = keras.saving.load_model(f"{folder}/{name}.keras")
    except Exception as error:  # reported per case by the test
        results[name] = f"load failed: {error!r}"
        continue
    x = np.load(f"{folder}/{name}.x.npy")
    want = np.load(f"{folder}/{name}.y.npy")
    got = model.predict(x, verbose=0)
    results[name] = "equal" if np.array_equal(got, want) else "differs"
print(json.dumps(results))
"""


def _python(code, *args):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result


CASES = [
    "docs-cnn",
    "token-ids",
    "fields",
    "zeros-init",
    "batchnorm",
    "method-name",
    "method-bound",
    "method-function",
    "own-config",
    "jax-layer",
    "nnx-from-nnx",
    "nnx-own-config",
]


@pytest.fixture(scope="module")
def loaded_in_new_process(tmp_path_factory):
    """Each case saved here and loaded in one new process: what loading
    and predicting gave, by case."""
    folder = tmp_path_factory.mktemp("saved")
    cases = _cases()
    assert sorted(cases) == sorted(CASES)
    for name, (model, shape) in cases.items():
        x = data(4, *shape, seed=7)
        if name == "token-ids":
            x = np.random.default_rng(7).integers(0, 50, (4, *shape))
        model.save(str(folder / f"{name}.keras"))
        np.save(folder / f"{name}.x.npy", x)
        np.save(folder / f"{name}.y.npy", model.predict(x, verbose=0))
    (folder / "cases.json").write_text(json.dumps(sorted(cases)))
    result = _python(LOADER, str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_case_loads_in_a_new_process_with_identical_predictions(
    loaded_in_new_process, name
):
    assert loaded_in_new_process[name] == "equal"


def test_unsaveable_field_fails_at_save_naming_the_field(tmp_path):
    module = modules.Configured(act=lambda x: x * 2)
    model = _functional(FlaxLayer(module, seed=0), (5,))
    path = tmp_path / "m.keras"
    with pytest.raises(
        TypeError,
        match=r"`module.act` cannot be saved: it is <function .*<lambda>.*"
        r"Make the value importable.*define `get_config\(\)`",
    ):
        model.save(str(path))
    assert not path.exists() or path.stat().st_size == 0


def test_closure_field_is_refused_the_same_way():
    scale = 3.0

    def act(x):
        return x * scale

    layer = FlaxLayer(modules.Configured(act=act))
    with pytest.raises(TypeError, match=r"`module.act` cannot be saved"):
        layer.get_config()


def test_nnx_module_without_a_recorded_call_or_config_names_both_fixes():
    layer = FlaxLayer(nnx_modules.MLP(nnx.Rngs(0)))
    with pytest.raises(
        TypeError,
        match=r"defines `get_config\(\)` / `from_config\(\)`.*"
        r"FlaxLayer.from_nnx\(cls, \*args, \*\*kwargs\).*save_weights",
    ):
        layer.get_config()


def test_a_refused_save_empties_the_target_and_get_config_checks_first(
    tmp_path,
):
    """What the README says of a refused `.keras` save: Keras opens the
    target before asking for configs, so an existing file is left empty;
    `model.get_config()` raises the same error and touches no file."""
    inputs = keras.Input((4,))
    layer = FlaxLayer(nnx_modules.MLP(nnx.Rngs(0)))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "m.keras"
    _functional(FlaxLayer(modules.MLP(), seed=0), (7,)).save(str(path))
    with pytest.raises(TypeError, match="from_nnx") as refused:
        model.get_config()
    assert path.stat().st_size > 0
    with pytest.raises(TypeError) as saving:
        model.save(str(path))
    assert str(saving.value) == str(refused.value)
    assert path.stat().st_size == 0


def test_from_nnx_refuses_a_non_class():
    with pytest.raises(
        TypeError, match=r"`module_class` of FlaxLayer.from_nnx"
    ):
        FlaxLayer.from_nnx(nnx_modules.MLP(nnx.Rngs(0)))


def test_resumed_training_continues_like_uninterrupted_training(tmp_path):
    def model_and_data():
        keras.utils.set_random_seed(0)
        layer = FlaxLayer(modules.BatchNormOnly(), seed=0)
        model = _functional(layer, (5,))
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        return model, data(16, 5), data(16, 1, seed=1)

    model, x, y = model_and_data()
    for _ in range(3):
        model.train_on_batch(x, y)
    path = str(tmp_path / "ckpt.keras")
    model.save(path)
    model.train_on_batch(x, y)
    resumed = keras.saving.load_model(path)
    resumed.train_on_batch(x, y)
    # The same weights, optimizer state and batch statistics after the step
    # (the loss `train_on_batch` returns is a running mean on Keras 3.14).
    for variables in ("weights", "optimizer_variables"):
        got = _values(resumed, variables)
        want = _values(model, variables)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


def _values(model, which):
    variables = model.weights
    if which == "optimizer_variables":
        variables = model.optimizer.variables
    return {v.path: np.asarray(v) for v in variables}


def test_clone_model_and_json_round_trips():
    model = _functional(FlaxLayer(modules.MLP(), seed=0), (7,))
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    x = data(3, 7)
    np.testing.assert_array_equal(
        clone.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    rebuilt = keras.models.model_from_json(model.to_json())
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_array_equal(
        rebuilt.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def _crafted(tmp_path, name, module_config):
    """A .keras file whose layer config names `module_config`."""
    model = _functional(FlaxLayer(modules.MLP(), seed=0), (7,))
    path = tmp_path / f"{name}.keras"
    model.save(str(path))
    with zipfile.ZipFile(path) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(files["config.json"])
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "FlaxLayer":
            layer["config"]["module"] = module_config
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for n, content in files.items():
            archive.writestr(n, content)
    return path


@pytest.mark.slow
def test_safe_mode_refuses_what_is_not_imported_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    tag = "__keras_flax__"
    attacks = {
        "system": {
            tag: "closure",
            "factory": "os:system",
            "kwargs": {tag: "dict", "items": {"command": f"touch {marker}"}},
        },
        "class": {tag: "module", "class": "os:system", "config": {}},
        "field": {
            tag: "module",
            "class": "tests.modules:Configured",
            "config": {"act": {tag: "object", "path": "os:system"}},
        },
        "numpy-call": {
            tag: "closure",
            "factory": "numpy:save",
            "kwargs": {tag: "dict", "items": {"file": str(marker)}},
        },
    }
    paths = {name: _crafted(tmp_path, name, c) for name, c in attacks.items()}
    good = tmp_path / "good.keras"
    _functional(FlaxLayer(modules.MLP(), seed=0), (7,)).save(str(good))
    code = """
    import sys, keras_flax, keras
    if sys.argv[1] == "import":
        from tests import modules
    for path in sys.argv[2:]:
        try:
            keras.saving.load_model(path)
            print("LOADED", path)
        except Exception as error:
            print("REFUSED", path, "|", str(error).replace("\\n", " "))
    """
    result = _python(code, "import", *map(str, paths.values()))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["REFUSED"] * len(attacks)
    assert "os:system" in result.stdout and "standard library" in result.stdout
    assert "numpy:save" in result.stdout and "initializer" in result.stdout
    assert not marker.exists()

    # The model's own code not imported: refused, naming it and the fix.
    result = _python(code, "none", str(good))
    assert "REFUSED" in result.stdout, result.stderr[-3000:]
    assert "tests.modules is not imported" in result.stdout
    assert "import tests.modules before loading" in result.stdout
    assert "safe_mode=False" in result.stdout


@pytest.mark.slow
def test_unsafe_mode_imports_the_model_code(tmp_path):
    good = tmp_path / "good.keras"
    _functional(FlaxLayer(modules.MLP(), seed=0), (7,)).save(str(good))
    code = """
    import sys, keras_flax, keras
    keras.saving.load_model(sys.argv[1], safe_mode=False)
    print("LOADED", "tests.modules" in sys.modules)
    """
    result = _python(code, str(good))
    assert result.stdout.strip().endswith("LOADED True"), result.stderr[-3000:]
