"""The shape of the package: one layer class over one contract, public
names of Keras, JAX and Flax outside `_private.py`, typed public API."""

import ast
import inspect
import pathlib
import typing

import keras_flax
from keras_flax import EquinoxLayer
from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import layer_flax_module_wrapper
from keras_flax import layer_jax_model_wrapper
from keras_flax._layer import ModelLayer

PACKAGE = pathlib.Path(keras_flax.__file__).parent
SOURCES = {p.name: ast.parse(p.read_text()) for p in PACKAGE.glob("*.py")}


def _own_names():
    """Names the package defines: its modules, and every attribute,
    function, class and method it creates."""
    names = {p.removesuffix(".py") for p in SOURCES}
    for tree in SOURCES.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(
                node.ctx, ast.Store
            ):
                names.add(node.attr)
            elif isinstance(
                node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)
            ):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return names


def test_no_private_name_of_keras_jax_or_flax_outside_private_py():
    own = _own_names()
    reached = []
    for name, tree in SOURCES.items():
        if name == "_private.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                for module in modules:
                    parts = module.split(".")
                    if parts[0] in ("keras", "jax", "flax") and (
                        "src" in parts or any(p.startswith("_") for p in parts)
                    ):
                        reached.append(f"{name}: import {module}")
            if isinstance(node, ast.Attribute):
                attr = node.attr
                private = attr.startswith("_") and not attr.startswith("__")
                if private and attr not in own:
                    reached.append(f"{name}: .{attr}")
    assert reached == []


def _imported_names(tree):
    """The names a file binds by importing (modules and their members)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def test_stack_walks_and_process_wide_swaps_are_in_private_py_alone():
    # Reading the call stack, setting attributes of other packages'
    # modules (Flax's `avg_pool`) and jax2onnx's internals are hacks: they
    # live in `_private.py`, behind a guard with a fallback.
    # (`setattr` on an object of the user's, an NNX module's node, is not
    # such a swap: only a target rooted at an imported name is.)
    frames = {"currentframe", "_getframe", "f_back", "f_globals"}
    reached = []
    for name, tree in SOURCES.items():
        if name == "_private.py":
            continue
        imported = _imported_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in frames:
                reached.append(f"{name}: .{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                target = node.args[0] if node.args else None
                while isinstance(target, ast.Attribute):
                    target = target.value
                on_import = (
                    isinstance(target, ast.Name) and target.id in imported
                )
                if node.func.id == "setattr" and on_import:
                    reached.append(f"{name}: {ast.unparse(node)}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                if any(m.split(".")[0] == "jax2onnx" for m in modules):
                    reached.append(f"{name}: import {modules}")
    assert reached == []


def test_the_public_classes_override_no_hook_of_the_layer():
    # JaxLayer and FlaxLayer make a Model and name public attributes.
    for cls in (JaxLayer, FlaxLayer, EquinoxLayer):
        private = [
            name
            for name in vars(cls)
            if name.startswith("_") and not name.startswith("__")
        ]
        assert private == [], cls
        overridden = [
            name
            for name in vars(cls)
            if name in vars(ModelLayer) and not name.startswith("__")
        ]
        assert overridden == [], cls
    assert issubclass(FlaxLayer, JaxLayer)  # as in keras.layers


def test_only_the_registry_and_the_adapters_ask_which_kind_a_model_is():
    # The layer classes find a kind through `_kinds.of`; nothing tests a
    # module's class elsewhere (no `isinstance(module, nnx.Module)`).
    asking = []
    for name, tree in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "is_nnx":
                asking.append(f"{name}: is_nnx")
            is_check = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
            )
            if not is_check:
                continue
            text = ast.unparse(node.args[1])
            if text in ("nn.Module", "nnx.Module") and name not in (
                "_kinds.py",
                "_linen.py",
                "_nnx.py",
                "_serialization.py",  # checks what a saved config names
                "_errors.py",  # words the fix for a class given
                "_checks.py",  # `from_nnx` takes NNX classes only
            ):
                asking.append(f"{name}: {ast.unparse(node)}")
    assert asking == []


def test_the_public_api_is_typed():
    assert (PACKAGE / "py.typed").exists()
    functions = [
        JaxLayer.__init__,
        FlaxLayer.__init__,
        FlaxLayer.from_nnx,
        EquinoxLayer.__init__,
        EquinoxLayer.from_constructor,
        layer_flax_module_wrapper,
        layer_jax_model_wrapper,
    ]
    for fn in functions:
        hints = typing.get_type_hints(fn)
        named = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.name not in ("self", "cls")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        assert set(named) <= set(hints), fn


# The registry and the adapters: the files that may name a kind.
ADAPTERS = {"_functions.py", "_linen.py", "_nnx.py", "_equinox.py"}
# Files whose strings equal a kind's name without naming the kind: the
# demo's `--api linen|nnx` choice, and `sys.modules.get("equinox")` (the
# package) in the allow-list of classes a file may name.
NOT_A_KIND = {
    ("demo.py", "linen"),
    ("demo.py", "nnx"),
    ("_names.py", "equinox"),
}


def test_no_file_outside_the_registry_and_the_adapters_names_a_kind():
    # A kind is named by importing its adapter or by its registered name;
    # the layer classes reach theirs through `_kinds` alone. So a new kind
    # touches its adapter and one `register` call.
    from keras_flax import _kinds

    kind_names = {kind.name for kind in _kinds.KINDS}
    adapters = {name.removesuffix(".py") for name in ADAPTERS}
    naming = []
    for name, tree in SOURCES.items():
        if name in ADAPTERS or name == "_kinds.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported = {a.name.split(".")[-1] for a in node.names}
                if isinstance(node, ast.ImportFrom) and node.module:
                    imported.add(node.module.split(".")[-1])
                naming += [f"{name}: import {m}" for m in imported & adapters]
            if (
                isinstance(node, ast.Constant)
                and node.value in kind_names
                and (name, node.value) not in NOT_A_KIND
            ):
                naming.append(f"{name}: {node.value!r}")
    assert naming == []


def test_a_kind_of_the_tests_alone_is_in_the_registry():
    # `tests/toy_kind.py` registers its kind as the built-in ones are; the
    # conformance suite (`model_test.py`) runs on it.
    from keras_flax import _kinds
    from tests import toy_kind

    kind = _kinds.of(toy_kind.Chain(()), "ToyLayer", repr)
    assert kind.adapt is toy_kind.adapt
    assert "toy" in {k.name for k in _kinds.KINDS}


def _code_lines(node):
    """A function's lines, its docstring left out."""
    lines = node.end_lineno - node.lineno + 1
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def _functions():
    for name, tree in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_files_and_functions_are_short():
    # No file over 600 lines, no function over 60 (docstrings left out),
    # and each adapter reads as the steps of adapting its kind.
    long_files = [
        name
        for name in SOURCES
        if len((PACKAGE / name).read_text().splitlines()) > 600
    ]
    long_functions = [
        f"{name}: {node.name}"
        for name, node in _functions()
        if _code_lines(node) > 60
    ]
    long_adapters = [
        f"{name}: {node.name}"
        for name, node in _functions()
        if name in ADAPTERS
        and node.name.startswith("adapt")
        and _code_lines(node) > 30
    ]
    assert (long_files, long_functions, long_adapters) == ([], [], [])


def test_the_layer_class_is_the_keras_protocol_alone():
    # What `ModelLayer` holds lives in `_holding`, how it calls its model in
    # `_calls`: the class stays at most 300 lines.
    tree = ast.parse((PACKAGE / "_layer.py").read_text())
    (layer,) = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "ModelLayer"
    ]
    assert layer.end_lineno is not None
    assert layer.end_lineno - layer.lineno + 1 <= 300


def test_user_code_errors_are_caught_only_to_be_reported():
    # `_user_code.attempt` turns a trial call's refusal into a value the
    # caller decides on; elsewhere a `UserCodeError` is caught only by a
    # handler that reports it (ends by raising).
    steering = []
    for name, tree in SOURCES.items():
        if name == "_user_code.py":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.ExceptHandler) or node.type is None:
                continue
            if "UserCodeError" in ast.unparse(node.type) and not isinstance(
                node.body[-1], ast.Raise
            ):
                steering.append(f"{name}:{node.lineno}")
    assert steering == []
