"""`keras-flax demo`: the Keras docs' Flax CNN trained on the digits data.

Trains the CNN of the `keras.layers.FlaxLayer` documentation, adapted to
8x8x1 images, on scikit-learn's bundled digits data set (no download), with
Keras' progress bar; prints the held-out accuracy, saves the weights,
reloads them into a fresh model and checks that its predictions are
identical. `--api nnx` runs the same CNN written with Flax NNX.
"""

import argparse
import os
import tempfile
import time
from typing import Any

import flax.linen as nn
from flax import nnx

from keras_flax._model import PyTree


class CNN(nn.Module):
    """The CNN of the Keras docs' FlaxLayer example, exactly as written."""

    @nn.compact
    def __call__(self, inputs: PyTree) -> Any:
        x = inputs
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten
        x = nn.Dense(features=200)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        x = nn.softmax(x)
        return x


class NNXCNN(nnx.Module):
    """The same CNN in Flax NNX, for 8x8x1 images."""

    def __init__(self, rngs: Any) -> None:
        self.conv = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(4 * 4 * 32, 200, rngs=rngs)
        self.dense2 = nnx.Linear(200, 10, rngs=rngs)

    def __call__(self, inputs: PyTree) -> Any:
        x = nnx.relu(self.conv(inputs))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten
        x = nnx.relu(self.dense1(x))
        return nnx.softmax(self.dense2(x))


def make_module(api: str, seed: int) -> nnx.Module | nn.Module:
    if api == "nnx":
        return NNXCNN(nnx.Rngs(seed))
    return CNN()


def load_digits_split(
    seed: Any,
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Digits as (N, 8, 8, 1) floats in [0, 1], split 80/20."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit(
            "The demo uses scikit-learn's bundled digits data set. Install "
            "it: pip install 'keras-flax[demo]'"
        ) from error
    import numpy as np

    data: Any = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def build_model(seed: Any, api: str = "linen", compile: bool = True) -> Any:
    import keras

    from keras_flax import FlaxLayer

    inputs = keras.Input((8, 8, 1))
    outputs = FlaxLayer(make_module(api, seed), seed=seed, name="cnn")(inputs)
    model = keras.Model(inputs, outputs)
    if not compile:
        return model
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def run(
    epochs: int = 15, batch_size: int = 32, seed: Any = 0, api: str = "linen"
) -> Any:
    """Trains, evaluates, saves and reloads; returns the test accuracy."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(seed)
    print(
        f"digits: {len(x_train)} training and {len(x_test)} test images "
        f"of 8x8x1, Flax API: {api}, Keras backend: {keras.backend.backend()}"
    )
    model = build_model(seed, api)
    model.summary()
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    # Keras annotates `verbose` as a string; it takes 0, 1, 2 as documented.
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)  # pyright: ignore
    print(f"held-out accuracy: {accuracy:.4f}")

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cnn.weights.h5")
        model.save_weights(path)
        fresh = build_model(seed + 1, api, compile=False)
        fresh.load_weights(path)
    same = np.array_equal(
        model.predict(x_test, verbose=0),  # pyright: ignore[reportArgumentType]
        fresh.predict(x_test, verbose=0),  # pyright: ignore[reportArgumentType]
    )
    print(f"weights saved and reloaded: predictions identical: {same}")
    if not same:
        raise SystemExit("reloaded model's predictions differ")
    return accuracy


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(
        prog="keras-flax demo", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api", choices=("linen", "nnx"), default="linen")
    args = parser.parse_args(argv)
    run(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        api=args.api,
    )
