"""Safe mode, fuzzed: every attribute path reachable from the modules a
file may name, to depth 4, in every config slot, with tripwires armed.

The names are `module:a.b.c.d` for each module below and each chain of
attributes through modules and classes; each goes through the resolver
(as a value and as something called) and, for a bounded sample, through
each config slot: the layer (or optimizer) is made from the edited config
by its `from_config`, as `load_model` makes it, and then built and called.
No tripwire (`tests/tripwires.py`) may be reached, no file written, no
module imported. `KERAS_FLAX_FUZZ=all` puts every name in every slot.
"""

import copy
import functools
import importlib
import os
import random
import sys
import types

import equinox as eqx
import jax
import keras
import optax
import pytest
from flax import nnx

from keras_flax import EquinoxLayer
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import OptaxOptimizer
from keras_flax import _names
from tests import modules
from tests import tripwires
from tests.conftest import data

TAG = "__keras_flax__"
DEPTH = 4

# The modules safe mode lets a file name or call, and those the routes
# found so far started from.
PREFIXES = (
    *sorted(_names._VALUE_MODULES),
    "optax",
    "optax.schedules",
    "jax._src.nn.initializers",
    "jax._src.xla_bridge",
    "numpy",
    "keras_flax._names",
    "keras_flax._safetensors",
    "keras_flax._serialization",
)


def attribute_paths(depth=DEPTH):
    """`{module:a.b...: object}` for every chain of at most `depth`
    attributes from each prefix, through modules and classes (each
    expanded once); the object is what a walk along it reaches."""
    for prefix in PREFIXES:
        importlib.import_module(prefix)
    seen = set()
    paths = {}
    frontier = [(prefix, (), sys.modules[prefix]) for prefix in PREFIXES]
    for _ in range(depth):
        following = []
        for prefix, chain, owner in frontier:
            for name in sorted(_attribute_names(owner)):
                value = _static(owner, name)
                paths[f"{prefix}:{'.'.join((*chain, name))}"] = value
                expandable = isinstance(value, (type, types.ModuleType))
                if expandable and id(value) not in seen:
                    seen.add(id(value))
                    following.append((prefix, (*chain, name), value))
        frontier = following
    return paths


def _attribute_names(owner):
    try:
        return [n for n in dir(owner) if isinstance(n, str)]
    except Exception:  # noqa: BLE001 (a third party's __dir__)
        return []


def _static(owner, name):
    """The attribute without running a module's `__getattr__` (a lazy
    import) or a descriptor."""
    try:
        if isinstance(owner, types.ModuleType):
            return vars(owner).get(name)
        return next(
            (vars(k)[name] for k in owner.__mro__ if name in vars(k)), None
        )
    except Exception:  # noqa: BLE001 (a third party's metaclass)
        return None


WALKED = attribute_paths()
PATHS = list(WALKED)
# The names whose walk reaches what a tripwire replaces: each goes into
# every slot (a resolver that walked attributes would reach them).
DANGEROUS = sorted(
    name
    for name, value in WALKED.items()
    if any(value is original for original in tripwires.originals())
)


def _object(name):
    return {TAG: "object", "path": name}


def _closure(name):
    return {
        TAG: "closure",
        "factory": name,
        "kwargs": {TAG: "dict", "items": {}},
    }


def _partial(name, *args):
    return {
        TAG: "partial",
        "func": _object(name),
        "args": {TAG: "list", "items": list(args)},
        "keywords": {TAG: "dict", "items": {}},
    }


def _templates():
    """`(class, config)` of a real layer (or optimizer) of each kind."""
    key = jax.random.PRNGKey(0)
    return {
        "linen": (FlaxLayer, FlaxLayer(modules.Configured()).get_config()),
        "nnx": (
            FlaxLayer,
            FlaxLayer.from_nnx(
                nnx.Linear,
                7,
                3,
                kernel_init=jax.nn.initializers.normal(0.02),
                rngs=nnx.Rngs(0),
                layer_kwargs={"wrt": nnx.Param},
            ).get_config(),
        ),
        "equinox": (
            EquinoxLayer,
            EquinoxLayer.from_constructor(
                eqx.nn.MLP, 7, 3, 4, 1, activation=jax.nn.relu, key=key
            ).get_config(),
        ),
        "jax": (
            JaxLayer,
            JaxLayer(modules.dense_call, modules.dense_init).get_config(),
        ),
        "optax": (
            OptaxOptimizer,
            OptaxOptimizer(optax.adam, learning_rate=1e-3).get_config(),
        ),
    }


def _field(name, make):
    def edit(config, value):
        config["module"]["config"][name] = make(value)

    return edit


def _call_kwarg(name, make):
    def edit(config, value):
        config["module"]["kwargs"]["items"][name] = make(value)

    return edit


def _key(key, make):
    def edit(config, value):
        config[key] = make(value)

    return edit


def _class(config, value):
    config["module"]["class"] = value


# Each config slot a name can stand in: (template, edit).
SLOTS = {
    "linen-field-value": ("linen", _field("act", _object)),
    "linen-field-closure": ("linen", _field("kernel_init", _closure)),
    "linen-field-partial": ("linen", _field("norm", _partial)),
    "linen-class": ("linen", _class),
    "linen-method": ("linen", _key("method", _object)),
    "nnx-class": ("nnx", _class),
    "nnx-argument-closure": ("nnx", _call_kwarg("kernel_init", _closure)),
    "nnx-wrt-type": ("nnx", _key("wrt", lambda name: {"type": name})),
    "nnx-wrt-function": (
        "nnx",
        _key("wrt", lambda name: {"function": _object(name)}),
    ),
    "equinox-class": ("equinox", _class),
    "equinox-argument": ("equinox", _call_kwarg("activation", _object)),
    "equinox-argument-partial": (
        "equinox",
        _call_kwarg("activation", lambda name: _partial(name, "x")),
    ),
    "jax-call-fn": ("jax", _key("call_fn", _object)),
    "jax-init-fn": ("jax", _key("init_fn", _object)),
    "optax-factory": ("optax", _key("factory", _object)),
}


def _load(template, edit, name):
    """What `load_model` does with the slot: `from_config`, then build."""
    cls, config = template
    config = copy.deepcopy(config)
    edit(config, name)
    try:
        made = cls.from_config(config)
        if isinstance(made, keras.layers.Layer):
            made(data(2, 7))
    except Exception:  # noqa: BLE001 (only what is reached counts here)
        pass


def test_the_resolver_never_reaches_a_tripwire(tmp_path):
    imported = set(sys.modules)
    resolved = 0
    with tripwires.armed() as reached:
        for name in PATHS:
            for called in (False, True):
                try:
                    _names.resolve(name, "fuzz", called=called)
                    resolved += 1
                except ValueError:
                    pass
    assert reached == []
    assert set(sys.modules) == imported
    # The names tried, how few safe mode resolves, and that the walk
    # found the routes to what the tripwires replace.
    assert len(PATHS) > 100_000 and resolved < len(PATHS) / 20
    assert len(DANGEROUS) > 20


@functools.cache
def _split():
    """The names the resolver accepts (as a value), and the others."""
    accepted, refused = [], []
    for name in PATHS:
        try:
            _names.resolve(name, "fuzz")
            accepted.append(name)
        except ValueError:
            refused.append(name)
    return accepted, refused


def _sample(size):
    """The dangerous names, then `size` others, half of them names the
    resolver accepts, in a fixed order (all with `KERAS_FLAX_FUZZ=all`)."""
    accepted, refused = _split()
    if os.environ.get("KERAS_FLAX_FUZZ") == "all":
        return accepted + refused
    rng = random.Random(0)
    half = min(size // 2, len(accepted))
    sample = rng.sample(accepted, half) + rng.sample(refused, size - half)
    return DANGEROUS + sample


def _fuzz_slots(size, tmp_path):
    templates = _templates()
    names = _sample(size)
    for name in names:  # JAX's and Keras' own lazy imports first
        _load(templates["linen"], SLOTS["linen-field-value"][1], name)
    imported = set(sys.modules)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # anything written lands here
    try:
        with tripwires.armed() as reached:
            for slot, (kind, edit) in SLOTS.items():
                for name in names:
                    _load(templates[kind], edit, name)
                    assert reached == [], (slot, name)
    finally:
        os.chdir(cwd)
    assert set(sys.modules) == imported
    assert list(tmp_path.iterdir()) == []


def test_every_config_slot_with_a_sample_of_names(tmp_path):
    _fuzz_slots(24, tmp_path)


@pytest.mark.slow
def test_every_config_slot_with_more_names(tmp_path):
    _fuzz_slots(240, tmp_path)
