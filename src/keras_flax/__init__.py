"""Flax (linen and NNX) modules and JAX models as Keras 3 layers.

Importing `keras_flax` before `keras` selects the JAX backend when
`KERAS_BACKEND` is unset; an explicit `KERAS_BACKEND` is never overridden,
and once Keras is imported its backend is used as it is.
"""

import os as _os
import sys as _sys

if "keras" not in _sys.modules:
    _os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_flax._compose import layer_flax_module_wrapper  # noqa: E402
from keras_flax._compose import layer_jax_model_wrapper  # noqa: E402
from keras_flax._equinox_layer import EquinoxLayer  # noqa: E402
from keras_flax._export import export_stablehlo  # noqa: E402
from keras_flax._flax_layer import FlaxLayer  # noqa: E402
from keras_flax._jax_layer import JaxLayer  # noqa: E402
from keras_flax._optax import LearningRateLogger  # noqa: E402
from keras_flax._optax import OptaxOptimizer  # noqa: E402
from keras_flax._safetensors import load_safetensors  # noqa: E402
from keras_flax._safetensors import save_safetensors  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EquinoxLayer",
    "FlaxLayer",
    "JaxLayer",
    "LearningRateLogger",
    "OptaxOptimizer",
    "export_stablehlo",
    "layer_flax_module_wrapper",
    "layer_jax_model_wrapper",
    "load_safetensors",
    "save_safetensors",
]
