"""Backend selection on import, and no TensorFlow on the JAX path."""

import os
import subprocess
import sys
import textwrap

import pytest

# Each test starts Python processes: run by `pytest -m slow` (CI).
pytestmark = pytest.mark.slow


def _run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(env_changes)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_importing_keras_flax_first_selects_jax_and_imports_no_tf_or_torch():
    out = _run(
        """
        import sys
        import keras_flax
        import keras, numpy as np, flax.linen as nn
        layer = keras_flax.FlaxLayer(nn.Dense(2))
        model = keras.Sequential([keras.Input((3,)), layer])
        model.compile("sgd", "mse")
        model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
        print(
            keras.backend.backend(),
            "tensorflow" in sys.modules,
            "torch" in sys.modules,
        )
        """
    )
    assert out == "jax False False"


def test_an_explicit_backend_is_kept_and_refused_with_the_fix():
    out = _run(
        """
        import keras_flax, keras, flax.linen as nn
        try:
            keras_flax.FlaxLayer(nn.Dense(2))
        except ValueError as error:
            print(keras.backend.backend(), "|", error)
        """,
        KERAS_BACKEND="numpy",
    )
    backend, message = out.split(" | ")
    assert backend == "numpy"
    assert "KERAS_BACKEND='numpy'" in message and "KERAS_BACKEND=jax" in message
