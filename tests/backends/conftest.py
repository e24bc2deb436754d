"""Tests that run on the Keras backend of the process.

Keras' backend is chosen once per process, so this folder is run once per
backend: `KERAS_BACKEND=tensorflow pytest tests/backends` (with
`tensorflow-cpu` installed) and `KERAS_BACKEND=torch pytest tests/backends`
(with torch installed). `common_test.py` runs on every backend, JAX
included; `tensorflow_test.py` and `torch_test.py` only on theirs.
"""

import keras

_ONLY_ON = {"tensorflow_test.py": "tensorflow", "torch_test.py": "torch"}

collect_ignore = [
    file
    for file, backend in _ONLY_ON.items()
    if backend != keras.backend.backend()
]
