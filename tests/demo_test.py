"""The demo: the README's main job."""

import pathlib
import subprocess
import sys

import pytest

from keras_flax import demo


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_demo_reaches_the_promised_accuracy(api):
    assert demo.run(epochs=15, batch_size=32, seed=0, api=api) > 0.95


@pytest.mark.slow
def test_console_command_runs_with_its_options():
    script = pathlib.Path(sys.executable).parent / "keras-flax"
    result = subprocess.run(
        [
            str(script),
            "demo",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--seed",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "held-out accuracy:" in result.stdout
    assert "predictions identical: True" in result.stdout
