"""LoRA fine-tuning of a pretrained Flax NNX classifier with Keras' `fit`.

    python examples/finetune_lora.py

1. Pretrains a small NNX classifier on scikit-learn's bundled digits data
   in plain Flax (`nnx.Optimizer` + Optax), and saves it with Orbax.
2. Builds the same classifier with LoRA-wrapped layers
   (`nnx.LoRALinear`), wraps it in a `FlaxLayer` that trains only the
   adapters (`wrt=nnx.LoRAParam`), and restores the checkpoint into it.
3. Fine-tunes it with `fit` on a shifted task (every image moved two pixels
   right and one down), and prints the accuracies and how far each kind of
   parameter moved: the pretrained weights not at all.
"""

import keras_flax  # noqa: F401, I001  (first: selects the JAX backend)
import argparse
import os
import tempfile

import keras
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax.demo import load_digits_split


class Classifier(nnx.Module):
    """An MLP for 8x8 digits; `linear` is `nnx.Linear` or, with its
    `lora_rank=`, `nnx.LoRALinear` (the same weights plus adapters)."""

    def __init__(self, hidden, rngs, linear=nnx.Linear, **lora):
        self.hidden = linear(64, hidden, rngs=rngs, **lora)
        self.out = linear(hidden, 10, rngs=rngs, **lora)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.out(nnx.relu(self.hidden(x)))


def shifted(x):
    """The new task's images: moved two pixels right and one down."""
    return np.roll(x, shift=(1, 2), axis=(1, 2))


def accuracy(logits, y):
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y))


def pretrain(hidden, epochs, train, seed=0):
    """Plain Flax NNX: `nnx.Optimizer` over every parameter."""
    model = Classifier(hidden, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, y
            ).mean()

        optimizer.update(model, nnx.grad(loss)(model))

    x, y = train
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            step(model, optimizer, x[i : i + 64], y[i : i + 64])
    return model


# The two kinds of parameters of the LoRA-wrapped classifier.
KINDS = {
    "LoRA": nnx.LoRAParam,
    "pretrained": nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)),
}


def values(module, kind):
    """The module's current values of one kind of parameters, by path."""
    flat = nnx.to_flat_state(nnx.state(module, KINDS[kind]))
    return {path: np.asarray(v.get_value()) for path, v in flat}


def run(hidden=64, rank=4, pretrain_epochs=20, finetune_epochs=10, seed=0):
    """Pretrains, checkpoints, restores into a LoRA layer and fine-tunes;
    returns the numbers it prints."""
    keras.utils.set_random_seed(seed)
    train, test = load_digits_split(seed)
    (x_train, y_train), (x_test, y_test) = train, test
    numbers = {}

    # 1. Plain Flax pretraining, saved with Orbax.
    pretrained = pretrain(hidden, pretrain_epochs, train, seed)
    numbers["pretrained accuracy"] = accuracy(pretrained(x_test), y_test)
    numbers["pretrained accuracy, shifted task"] = accuracy(
        pretrained(shifted(x_test)), y_test
    )
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pretrained")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, nnx.state(pretrained))
        checkpointer.wait_until_finished()

        # 2. The LoRA-wrapped classifier in a layer training the adapters
        # only; the checkpoint restored into it (adapters as initialised).
        lora = Classifier(
            hidden, nnx.Rngs(seed + 1), linear=nnx.LoRALinear, lora_rank=rank
        )
        layer = FlaxLayer(lora, wrt=nnx.LoRAParam, name="classifier")
        target = nnx.state(
            nnx.eval_shape(lambda: Classifier(hidden, nnx.Rngs(0)))
        )
        restored = checkpointer.restore(path, target)
    variables = layer.flax_variables
    nnx.replace_by_pure_dict(variables, nnx.to_pure_dict(restored))
    layer.flax_variables = variables
    model = keras.Sequential([keras.Input((8, 8, 1)), layer])
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary()
    before = {kind: values(lora, kind) for kind in KINDS}
    numbers["restored accuracy"] = accuracy(
        model.predict(x_test, verbose=0), y_test
    )
    numbers["restored accuracy, shifted task"] = accuracy(
        model.predict(shifted(x_test), verbose=0), y_test
    )

    # 3. Fine-tuning on the shifted task.
    model.fit(shifted(x_train), y_train, batch_size=64, epochs=finetune_epochs)
    numbers["fine-tuned accuracy, shifted task"] = accuracy(
        model.predict(shifted(x_test), verbose=0), y_test
    )
    for kind, held in before.items():
        now = values(lora, kind)  # the module follows the layer
        numbers[f"largest change, {kind} parameters"] = max(
            float(np.max(np.abs(now[path] - value)))
            for path, value in held.items()
        )
    numbers["trainable parameters"] = sum(
        int(np.prod(v.shape)) for v in layer.trainable_weights
    )
    numbers["non-trainable parameters"] = sum(
        int(np.prod(v.shape)) for v in layer.non_trainable_weights
    )
    for name, value in numbers.items():
        print(f"{name}: {value:.4g}")
    return numbers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(
        args.hidden,
        args.rank,
        args.pretrain_epochs,
        args.finetune_epochs,
        args.seed,
    )


if __name__ == "__main__":
    main()
