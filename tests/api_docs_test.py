"""The API reference covers every public name.

Each name of `keras_flax.__all__` has a page under `docs/api/` rendering it
(`::: keras_flax.<name>`, mkdocstrings), and its docstring, read by griffe
(the parser the site is built with), documents every argument of its
signature, its return value, and has an example. Each public method and
property the layers, the optimizer and the callback add to Keras' own is
listed on its class's page and documents its arguments too.
"""

import inspect
import pathlib
import re

import griffe
import keras
import pytest

import keras_flax

API = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api"
KERAS_BASES = (
    keras.layers.Layer,
    keras.optimizers.Optimizer,
    keras.callbacks.Callback,
)
# Keras methods the layers override and document, beyond what they add.
DOCUMENTED_OVERRIDES = {"quantize"}
# Public names that raise nothing of their own.
RAISE_NOTHING = {"LearningRateLogger"}


def sections(obj):
    """`{kind: section}` of `obj`'s docstring, parsed as the site does."""
    docstring = griffe.Docstring(inspect.getdoc(obj) or "")
    parsed = docstring.parse("google")
    return {section.kind.value: section for section in parsed}


def documented_arguments(obj):
    found = sections(obj).get("parameters")
    if found is None:
        return set()
    return {parameter.name.lstrip("*") for parameter in found.value}


def signature_arguments(obj):
    function = obj.__init__ if inspect.isclass(obj) else obj
    return {
        name
        for name in inspect.signature(function).parameters
        if name not in ("self", "cls")
    }


def public_members(cls):
    """The public methods and properties `cls` adds to its Keras base."""
    base = next(b for b in KERAS_BASES if issubclass(cls, b))
    names = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("keras_flax"):
            continue
        for name in vars(klass):
            public = not name.startswith("_")
            new = not hasattr(base, name) or name in DOCUMENTED_OVERRIDES
            if public and new and name not in names:
                names.append(name)
    return names


def page(name):
    path = API / f"{name}.md"
    assert path.exists(), f"{name} has no page under docs/api/"
    return path.read_text()


@pytest.mark.parametrize("name", keras_flax.__all__)
def test_every_public_name_has_a_page(name):
    assert re.search(rf"^::: keras_flax\.{name}$", page(name), re.MULTILINE)


@pytest.mark.parametrize("name", keras_flax.__all__)
def test_every_argument_return_value_and_example_is_documented(name):
    obj = getattr(keras_flax, name)
    assert signature_arguments(obj) <= documented_arguments(obj)
    found = sections(obj)
    assert "examples" in found, f"{name} has no example"
    if name not in RAISE_NOTHING:
        assert "raises" in found, f"{name} does not say what it raises"
    returns = inspect.signature(obj).return_annotation
    if not inspect.isclass(obj) and returns not in (None, "None"):
        assert "returns" in found, f"{name} documents no return value"


def _members():
    return [
        (name, member)
        for name in keras_flax.__all__
        if inspect.isclass(getattr(keras_flax, name))
        for member in public_members(getattr(keras_flax, name))
    ]


@pytest.mark.parametrize(("name", "member"), _members())
def test_every_public_member_is_on_its_page_and_documented(name, member):
    listed = re.findall(r"^        - (\w+)$", page(name), re.MULTILINE)
    assert member in listed, f"{name}.{member} is not listed on its page"
    attribute = inspect.getattr_static(getattr(keras_flax, name), member)
    function = getattr(attribute, "__func__", attribute)
    if isinstance(attribute, property):
        assert inspect.getdoc(attribute.fget), f"{name}.{member}"
        return
    assert inspect.getdoc(function), f"{name}.{member} has no docstring"
    assert signature_arguments(function) <= documented_arguments(function), (
        f"{name}.{member}"
    )


def test_the_members_found_are_the_public_ones():
    # A check of the check: the names the layers add are found.
    assert {
        "from_nnx",
        "input_dim",
        "flax_variables",
        "params",
        "quantize",
    } <= (set(public_members(keras_flax.FlaxLayer)))
