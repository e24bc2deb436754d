"""Safe mode: a crafted `.keras` file runs no code (SPEC 5).

Each route an attacker took is a file edited by hand from a saved model,
loaded with `keras.saving.load_model(path)` (safe mode, Keras' default)
while what it reaches for is replaced by tripwires (`tests/tripwires.py`).
"""

import json
import sys
import zipfile

import equinox as eqx
import jax
import keras
import numpy as np
import optax
import pytest
from flax import nnx

from keras_flax import EquinoxLayer
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import OptaxOptimizer
from tests import modules
from tests import tripwires
from tests.conftest import data

TAG = "__keras_flax__"
KEY = jax.random.PRNGKey(0)


def _model(kind):
    inputs = keras.Input((7,))
    if kind == "linen":
        layer = FlaxLayer(modules.Configured(), seed=0)
    elif kind == "nnx":
        layer = FlaxLayer.from_nnx(
            nnx.Linear,
            7,
            3,
            kernel_init=jax.nn.initializers.normal(0.02),
            rngs=nnx.Rngs(0),
            layer_kwargs={"wrt": nnx.Param},
        )
    elif kind == "equinox":
        layer = EquinoxLayer.from_constructor(
            eqx.nn.MLP, 7, 3, 4, 1, activation=jax.nn.relu, key=KEY
        )
    else:
        layer = JaxLayer(modules.dense_call, modules.dense_init, seed=0)
    model = keras.Model(inputs, layer(inputs))
    model.compile(OptaxOptimizer(optax.adamw, learning_rate=1e-3), "mse")
    model.fit(data(8, 7), data(8, model.output.shape[-1]), verbose=0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A `.keras` file of each kind of layer, compiled with Optax.

    Each is loaded once before any tripwire is armed: JAX and Keras import
    some of their own modules on first use, which is not the file's doing.
    """
    folder = tmp_path_factory.mktemp("saved")
    paths = {}
    for kind in ("linen", "nnx", "equinox", "jax"):
        paths[kind] = folder / f"{kind}.keras"
        _model(kind).save(paths[kind])
        keras.saving.load_model(paths[kind]).predict(data(2, 7), verbose=0)
    return paths


def _crafted(source, target, edit):
    """`source` with its config edited by `edit(layer_config, config)`."""
    with zipfile.ZipFile(source) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(files["config.json"])
    layer = next(
        layer
        for layer in config["config"]["layers"]
        if layer["class_name"] in ("FlaxLayer", "EquinoxLayer", "JaxLayer")
    )
    edit(layer["config"], config)
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return target


def _closure(factory, **kwargs):
    return {
        TAG: "closure",
        "factory": factory,
        "kwargs": {TAG: "dict", "items": kwargs},
    }


def _object(path):
    return {TAG: "object", "path": path}


def _partial(func, *args):
    return {
        TAG: "partial",
        "func": func,
        "args": {TAG: "list", "items": list(args)},
        "keywords": {TAG: "dict", "items": {}},
    }


def _set_field(name, value):
    def edit(layer, config):
        layer["module"]["config"][name] = value

    return edit


def _set_call_kwarg(name, value):
    def edit(layer, config):
        layer["module"]["kwargs"]["items"][name] = value

    return edit


def _set_optimizer(factory, **kwargs):
    def edit(layer, config):
        optimizer = config["compile_config"]["optimizer"]["config"]
        optimizer["factory"] = _object(factory)
        optimizer["kwargs"] = {TAG: "dict", "items": kwargs}

    return edit


def _set(key, value):
    def edit(layer, config):
        layer[key] = value

    return edit


def _lambda_of(fn):
    def edit(layer, config):
        layer["module"]["class"] = "equinox.nn:Lambda"
        layer["module"]["args"] = {TAG: "list", "items": [fn]}
        layer["module"]["kwargs"] = {TAG: "dict", "items": {}}

    return edit


TRAVERSAL = "jax._src.nn.initializers:core.config.os.system"
SUBPROCESS = "jax._src.nn.initializers:np.f2py.subprocess.run"
IMPORT = "jax._src.xla_bridge:importlib.import_module"
SHELL = "keras_flax._safetensors:os.system"


def _routes(marker):
    command = f"touch {marker}"
    return {
        # 1. Attribute traversal in names, in each config slot.
        "linen-field-traversal": (
            "linen",
            _set_field("kernel_init", _closure(TRAVERSAL, command=command)),
            TRAVERSAL,
        ),
        "linen-field-subprocess": (
            "linen",
            _set_field(
                "kernel_init",
                _closure(SUBPROCESS, args=command, shell=True),
            ),
            SUBPROCESS,
        ),
        "linen-field-savetxt": (
            "linen",
            _set_field(
                "kernel_init", _closure("numpy:savetxt", fname=str(marker))
            ),
            "numpy:savetxt",
        ),
        "linen-field-partial": (
            "linen",
            _set_field("norm", _partial(_object("numpy:savetxt"), str(marker))),
            "numpy:savetxt",
        ),
        "linen-field-object": (
            "linen",
            _set_field("act", _object(SHELL)),
            SHELL,
        ),
        "linen-class": (
            "linen",
            _set("module", {TAG: "module", "class": SHELL, "config": {}}),
            SHELL,
        ),
        "linen-method": ("linen", _set("method", _object(IMPORT)), IMPORT),
        "nnx-call-argument": (
            "nnx",
            _set_call_kwarg(
                "kernel_init", _closure(TRAVERSAL, command=command)
            ),
            TRAVERSAL,
        ),
        "nnx-wrt-type": (
            "nnx",
            _set("wrt", {"type": "flax.nnx:variablelib.sys.modules"}),
            "flax.nnx:variablelib.sys.modules",
        ),
        "nnx-wrt-function": (
            "nnx",
            _set("wrt", {"function": _object(SHELL)}),
            SHELL,
        ),
        "equinox-call-argument": (
            "equinox",
            _set_call_kwarg("activation", _object(SHELL)),
            SHELL,
        ),
        "equinox-lambda-import": (
            "equinox",
            _lambda_of(_partial(_object(IMPORT), "antigravity")),
            IMPORT,
        ),
        "jax-call-fn": ("jax", _set("call_fn", _object(SHELL)), SHELL),
        # 2. Optax factories, in the compile config.
        "optax-savetxt": (
            "linen",
            _set_optimizer("numpy:savetxt", fname=str(marker), X=[1.0]),
            "numpy:savetxt",
        ),
        "optax-traversal": (
            "linen",
            _set_optimizer(SHELL, command=command),
            SHELL,
        ),
        # 3. The standard library named directly.
        "stdlib-closure": (
            "linen",
            _set_field("kernel_init", _closure("os:system", command=command)),
            "os:system",
        ),
    }


ROUTES = sorted(_routes("marker"))


@pytest.mark.parametrize("route", ROUTES)
def test_a_crafted_file_is_refused_before_anything_runs(route, saved, tmp_path):
    marker = tmp_path / "PWNED"
    kind, edit, name = _routes(marker)[route]
    path = _crafted(saved[kind], tmp_path / "crafted.keras", edit)
    imported = set(sys.modules)
    with tripwires.armed() as reached:
        with pytest.raises(ValueError) as refused:
            keras.saving.load_model(path)
    assert reached == []
    assert not marker.exists()
    assert set(sys.modules) == imported  # nothing imported (np.f2py)
    message = str(refused.value)
    assert name in message
    fixes = ("safe_mode=False", "does not define", "altered")
    assert any(fix in message for fix in fixes), message


def test_the_crafted_files_load_unedited(saved, tmp_path):
    """The files the routes edit load and predict as saved (in the same
    tripwires: loading itself reaches none)."""
    x = data(4, 7)
    for kind, path in saved.items():
        with tripwires.armed() as reached:
            loaded = keras.saving.load_model(path)
        assert reached == [], kind
        original = _model(kind)
        original.set_weights(loaded.get_weights())
        np.testing.assert_array_equal(
            loaded.predict(x, verbose=0), original.predict(x, verbose=0)
        )


def test_compile_false_skips_the_optimizer_but_not_the_layer(saved, tmp_path):
    marker = tmp_path / "PWNED"
    edit = _set_field("kernel_init", _closure(TRAVERSAL, command="true"))
    path = _crafted(saved["linen"], tmp_path / "crafted.keras", edit)
    with tripwires.armed() as reached:
        with pytest.raises(ValueError, match="core.config.os.system"):
            keras.saving.load_model(path, compile=False)
    assert reached == [] and not marker.exists()


def test_unsafe_mode_still_resolves_names_exactly(saved, tmp_path):
    """`safe_mode=False` lets a trusted file import its code and call its
    own functions; a name still means one object, never a walk."""
    path = _crafted(
        saved["linen"],
        tmp_path / "crafted.keras",
        _set_field("kernel_init", _closure(TRAVERSAL, command="true")),
    )
    with tripwires.armed() as reached:
        with pytest.raises(ValueError, match="does not define"):
            keras.saving.load_model(path, safe_mode=False)
    assert reached == []


def test_registered_and_custom_objects_may_be_called(saved, tmp_path):
    """A factory of the user's own loads when registered or passed in
    `custom_objects` (the fixes the refusal names)."""
    model = _model("linen")
    model.compile(OptaxOptimizer(own_adam, learning_rate=1e-3), "mse")
    model.fit(data(8, 7), data(8, model.output.shape[-1]), verbose=0)
    path = tmp_path / "own.keras"
    model.save(path)
    with pytest.raises(ValueError, match="safe_mode_test:own_adam"):
        keras.saving.load_model(path)
    name = "tests.safe_mode_test:own_adam"
    loaded = keras.saving.load_model(path, custom_objects={name: own_adam})
    assert loaded.optimizer.get_config()["factory"]["path"] == name
    registered = keras.saving.register_keras_serializable("tests")(own_adam)
    try:
        keras.saving.load_model(path)
    finally:
        keras.saving.get_custom_objects().pop("tests>own_adam")
    assert registered is own_adam


def own_adam(learning_rate):
    return optax.adam(learning_rate)
