"""`model.summary(expand_nested=True)`: a wrapped module's submodules as
nested rows, against plain Flax on the same module (`nnx.state` sizes,
`nnx.tabulate`'s total, linen's variables and captured intermediates)."""

import math
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import JaxLayer
from keras_flax import _private
from tests import nnx_modules as m
from tests.conftest import data


class Block(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


class Net(nnx.Module):
    """Nested blocks, a list, a weight beside submodules, a shared one."""

    def __init__(self, rngs):
        self.block1 = Block(6, 8, rngs=rngs)
        self.block2 = Block(8, 4, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(4, 2, rngs=rngs)])
        self.tied = self.block1.linear  # shared: held at its first path
        self.scale = nnx.Param(jnp.ones((2,)))

    def __call__(self, x):
        return self.heads[0](self.block2(self.block1(x))) * self.scale


def _size(tree):
    return sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree))


def _rows(layer):
    """Every row, depth first, by path."""
    found = {}

    def walk(rows):
        for row in rows:
            found[row.name] = row
            walk(row.layers)

    walk(layer.layers)
    return found


def _summary_text(model, **kwargs):
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line), **kwargs)
    return "\n".join(lines)


def _built_net():
    module = Net(nnx.Rngs(0))
    layer = FlaxLayer(module, name="net")
    model = keras.Sequential([keras.Input((6,)), layer])
    return module, layer, model


def test_nnx_rows_count_each_submodule_as_its_state_does():
    module, layer, _ = _built_net()
    rows = _rows(layer)
    assert [row.name for row in layer.layers] == [
        "block1",
        "block2",
        "heads",
        "scale",
    ]
    assert type(rows["block1"]).__name__ == "Block"
    assert type(rows["block1/linear"]).__name__ == "Linear"
    assert type(rows["heads/0"]).__name__ == "Linear"
    assert type(rows["scale"]).__name__ == "Param"
    assert "tied" not in rows  # shared with block1/linear: counted there
    for path in ["block1", "block1/linear", "block1/bn", "block2", "heads/0"]:
        submodule = module
        for part in path.split("/"):
            submodule = (
                submodule[int(part)]
                if part.isdigit()
                else getattr(submodule, part)
            )
        assert rows[path].count_params() == _size(nnx.state(submodule))
        assert rows[path].count_params().non_trainable == _size(
            nnx.state(submodule, nnx.BatchStat)
        )
    # The rows of each level add up to the row above, the top ones to the
    # layer: nothing counted twice.
    assert sum(r.count_params() for r in layer.layers) == layer.count_params()
    for row in rows.values():
        if row.layers:
            assert (
                sum(r.count_params() for r in row.layers) == row.count_params()
            )


def test_nnx_rows_total_is_nnx_tabulate_total():
    _, layer, _ = _built_net()
    # In a process of its own: `nnx.tabulate` leaves the methods of the
    # classes it ran copied into them, after which (Flax 0.12) a later
    # `nnx.capture(..., method_outputs=...)` of those classes recurses.
    program = (
        "import jax.numpy as jnp; from flax import nnx; "
        "from tests.summary_test import Net; "
        "print(nnx.tabulate(Net(nnx.Rngs(0)), jnp.ones((1, 6)), "
        "console_kwargs={'width': 300}))"
    )
    table = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(__file__).parents[1],
    ).stdout
    total = re.search(r"Total Parameters: ([\d,]+)", table).group(1)
    assert int(total.replace(",", "")) == layer.count_params()
    assert sum(r.count_params() for r in layer.layers) == layer.count_params()


def test_nnx_rows_give_the_output_shape_of_each_submodule():
    module, layer, _ = _built_net()
    rows = _rows(layer)
    x = data(3, 6)
    h = module.block1(x)
    assert rows["block1"].output_shape == (None, *h.shape[1:])
    assert rows["block1/linear"].output_shape == (None, 8)
    assert rows["block2"].output_shape == (None, *module.block2(h).shape[1:])
    assert rows["heads/0"].output_shape == (None, 2)
    assert not hasattr(rows["heads"], "output_shape")  # a list: not called


def test_summary_prints_the_nested_rows_only_when_asked(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table printed whole
    _, layer, model = _built_net()
    nested = _summary_text(model, expand_nested=True, line_length=140)
    assert "└ block1 (Block)" in nested
    assert re.search(
        r"└ block1/linear \(Linear\)\s+│ \(None, 8\)\s+│\s+56 │", nested
    )
    assert re.search(
        r"└ block1/bn \(BatchNorm\).*32 \(16 non-trainable\)", nested
    )
    assert f"{layer.count_params():,}" in nested
    flat = _summary_text(model, line_length=140)
    assert "block1" not in flat and "net (FlaxLayer)" in flat


def test_stacked_blocks_are_one_row_counted_whole():
    module = m.ScannedBlocks(3, 4, rngs=nnx.Rngs(0))
    layer = FlaxLayer(module)
    layer.build((None, 4))
    rows = _rows(layer)
    row = rows["blocks"].count_params()
    assert row - row.non_trainable == _size(nnx.state(module.blocks, nnx.Param))
    assert row.non_trainable > 0  # the blocks' stacked dropout keys
    assert sum(r.count_params() for r in layer.layers) == layer.count_params()


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="dense")(x)
        x = nn.BatchNorm(use_running_average=True, name="norm")(x)

        class Step(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return nn.tanh(nn.Dense(8)(x)), None

        scanned = nn.scan(
            Step,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = scanned(name="steps")(x, None)
        return nn.Dense(2, name="head")(x)


def test_linen_rows_match_init_and_captured_intermediates():
    module = LinenNet()
    layer = FlaxLayer(module, seed=0)
    layer.build((None, 5))
    variables = layer.flax_variables
    rows = _rows(layer)
    assert [row.name for row in layer.layers] == [
        "dense",
        "norm",
        "steps",
        "head",
    ]
    assert type(rows["steps"]).__name__ == "Step"
    for path in ["dense", "norm", "steps", "head"]:
        held = {c: tree[path] for c, tree in variables.items() if path in tree}
        assert rows[path].count_params() == _size(held)
    assert rows["norm"].count_params().non_trainable == _size(
        variables["batch_stats"]["norm"]
    )
    assert rows["steps"].count_params() == 3 * (8 * 8 + 8)  # scanned: whole
    assert sum(r.count_params() for r in layer.layers) == layer.count_params()
    _, captured = module.apply(
        variables, data(3, 5), capture_intermediates=True, mutable=True
    )
    outputs = captured["intermediates"]
    for path in ["dense", "norm", "head"]:
        (shape,) = [o.shape for o in outputs[path]["__call__"]]
        assert rows[path].output_shape == (None, *shape[1:])


def test_rows_tell_what_wrt_freezes_and_work_packed():
    layer = FlaxLayer(
        Net(nnx.Rngs(0)), wrt=nnx.PathContains("heads"), pack_weights=True
    )
    layer.build((None, 6))
    rows = _rows(layer)
    assert rows["heads/0"].count_params().non_trainable == 0
    assert rows["block1/linear"].count_params().non_trainable == 56
    assert not rows["block1/linear"].trainable and rows["heads/0"].trainable
    assert sum(r.count_params() for r in layer.layers) == layer.count_params()


def test_a_module_without_submodules_shows_its_weights():
    layer = FlaxLayer(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    layer.build((None, 3))
    assert {r.name: int(r.count_params()) for r in layer.layers} == {
        "bias": 4,
        "kernel": 12,
    }


def test_no_rows_unbuilt_or_without_submodules_known():
    assert FlaxLayer(Net(nnx.Rngs(0))).layers == []
    layer = JaxLayer(
        lambda params, inputs: inputs @ params, params=jnp.ones((3, 2))
    )
    layer.build((None, 3))
    assert layer.layers == []


def test_fallback_where_keras_reads_other_names_is_one_row(monkeypatch):
    assert _private.NESTED_SUMMARY  # this Keras reads what rows have
    _, layer, model = _built_net()
    monkeypatch.setattr(_private, "NESTED_SUMMARY", False)
    assert layer.layers == []
    text = _summary_text(model, expand_nested=True, line_length=140)
    assert "net (FlaxLayer)" in text and "block1" not in text


def test_the_private_names_check_finds_another_name():
    class Summary:
        """A stand-in for Keras' summary module reading one more name."""

        @staticmethod
        def format_layer_shape(layer):
            return layer._output_shapes

        @staticmethod
        def print_summary(model):
            def get_layer_fields(layer):
                return layer.name

            def get_connections(layer):
                return layer._inbound_nodes

            def print_layer(layer):
                return get_layer_fields(layer), get_connections(layer)

            return print_layer(model)

    assert _private.nested_summary() is True
    assert _private.nested_summary(Summary) is False
    assert _private.nested_summary(None) is False


@pytest.mark.parametrize("expand_nested", [True, False])
def test_functional_model_summary(expand_nested):
    inputs = keras.Input((6,))
    layer = FlaxLayer(Net(nnx.Rngs(0)), name="net")
    outputs = keras.layers.Add()([layer(inputs), layer(inputs)])
    model = keras.Model(inputs, outputs)
    text = _summary_text(model, expand_nested=expand_nested, line_length=160)
    assert ("└ block2 (Block)" in text) == expand_nested
