"""Tests that run on the Keras backend of the process.

Keras' backend is chosen once per process, so this folder is run once per
backend: `KERAS_BACKEND=tensorflow pytest tests/backends` (with
`tensorflow-cpu` installed) and `KERAS_BACKEND=torch pytest tests/backends`
(with torch installed). `common_test.py` runs on every backend, JAX
included; `tensorflow_test.py` and `torch_test.py` only on theirs;
`jax_saved_model_test.py` on JAX where TensorFlow is installed
(`KERAS_BACKEND=jax pytest tests/backends/jax_saved_model_test.py` in the
TensorFlow environment).
"""

import importlib.util

import keras

_backend = keras.backend.backend()
_tensorflow = importlib.util.find_spec("tensorflow") is not None

_COLLECTED = {
    "tensorflow_test.py": _backend == "tensorflow",
    "torch_test.py": _backend == "torch",
    "jax_saved_model_test.py": _backend == "jax" and _tensorflow,
}

collect_ignore = [
    file for file, collected in _COLLECTED.items() if not collected
]
