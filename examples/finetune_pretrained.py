"""A PyTorch-trained model, fine-tuned with LoRA in Keras, back to PyTorch.

    python examples/finetune_pretrained.py

1. Trains a small PyTorch classifier (Linear, LayerNorm, Linear) on
   scikit-learn's bundled digits data and saves its `state_dict()` as a
   safetensors file, as pretrained weights come.
2. Builds the same architecture in Flax NNX with LoRA-wrapped layers
   (`nnx.LoRALinear`), wraps it in a `FlaxLayer` training the adapters
   only, and reads the checkpoint into it with `rules="torch"`: the layer
   predicts exactly as the PyTorch model does.
3. Fine-tunes the adapters with `fit` under `keras.distribution.
   DataParallel` on a shifted task (every image moved two pixels right and
   one down).
4. Saves the weights with the adapters merged into the kernels
   (`save_safetensors(..., rules="torch", merge_lora=True)`), and loads
   them into a fresh PyTorch model (`load_state_dict(strict=True)`),
   which then predicts as the fine-tuned Keras model does.
"""

import keras_flax  # noqa: F401, I001  (first: selects the JAX backend)
import argparse
import os
import tempfile

import keras
import numpy as np
import safetensors.torch
import torch
from flax import nnx

from keras_flax import FlaxLayer
from keras_flax import load_safetensors
from keras_flax import save_safetensors
from keras_flax.demo import load_digits_split


class TorchClassifier(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.hidden = torch.nn.Linear(64, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.out = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.out(torch.relu(self.norm(self.hidden(x))))


class Classifier(nnx.Module):
    """The same in NNX; `linear` is `nnx.Linear` or, with `lora_rank=`,
    `nnx.LoRALinear` (the same weights plus adapters)."""

    def __init__(self, hidden, rngs, linear=nnx.Linear, **lora):
        self.hidden = linear(64, hidden, rngs=rngs, **lora)
        self.norm = nnx.LayerNorm(hidden, epsilon=1e-5, rngs=rngs)
        self.out = linear(hidden, 10, rngs=rngs, **lora)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def shifted(x):
    """The new task's images: moved two pixels right and one down."""
    return np.roll(x, shift=(1, 2), axis=(1, 2))


# `DataParallel` splits every batch over the devices: whole batches only.
BATCH = 64


def whole_batches(x, y):
    n = len(x) - len(x) % BATCH
    return x[:n], y[:n]


def accuracy(logits, y):
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y))


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def pretrain_in_torch(hidden, epochs, train, seed):
    torch.manual_seed(seed)
    model = TorchClassifier(hidden)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = (torch.from_numpy(a) for a in train)
    for _ in range(epochs):
        for i in range(0, len(x), BATCH):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(x[i : i + BATCH]), y[i : i + BATCH].long()
            )
            loss.backward()
            optimizer.step()
    return model.eval()


def run(hidden=64, rank=4, pretrain_epochs=20, finetune_epochs=10, seed=0):
    """Steps 1-4; returns the numbers it prints."""
    keras.utils.set_random_seed(seed)
    train, test = (whole_batches(*split) for split in load_digits_split(seed))
    (x_train, y_train), (x_test, y_test) = train, test
    numbers = {}
    with tempfile.TemporaryDirectory() as folder:
        # 1. PyTorch pretraining, saved as safetensors.
        pretrained = pretrain_in_torch(hidden, pretrain_epochs, train, seed)
        path = os.path.join(folder, "pretrained.safetensors")
        safetensors.torch.save_file(pretrained.state_dict(), path)
        numbers["PyTorch accuracy"] = accuracy(
            torch_logits(pretrained, x_test), y_test
        )

        # 2. The same architecture in NNX with adapters, read from the file.
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        lora = Classifier(
            hidden, nnx.Rngs(seed + 1), linear=nnx.LoRALinear, lora_rank=rank
        )
        layer = FlaxLayer(lora, wrt=nnx.LoRAParam, name="classifier")
        report = load_safetensors(layer, path, rules="torch", strict=False)
        # The adapters are new: the only weights the file does not hold.
        assert all("lora" in name for name in report["missing"]), report
        model = keras.Sequential([keras.Input((8, 8, 1)), layer])
        model.compile(
            keras.optimizers.Adam(1e-2),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        numbers["loaded: largest logit difference to PyTorch"] = float(
            np.max(
                np.abs(
                    model.predict(x_test, batch_size=BATCH, verbose=0)
                    - torch_logits(pretrained, x_test)
                )
            )
        )
        numbers["loaded accuracy, shifted task"] = accuracy(
            model.predict(shifted(x_test), batch_size=BATCH, verbose=0), y_test
        )

        # 3. LoRA fine-tuning under DataParallel.
        model.fit(
            shifted(x_train), y_train, batch_size=BATCH, epochs=finetune_epochs
        )
        logits = model.predict(shifted(x_test), batch_size=BATCH, verbose=0)
        numbers["fine-tuned accuracy, shifted task"] = accuracy(logits, y_test)
        keras.distribution.set_distribution(None)

        # 4. Adapters merged into the kernels (`kernel + lora_a @ lora_b`),
        # saved for PyTorch, loaded strictly there.
        out = os.path.join(folder, "finetuned.safetensors")
        save_safetensors(layer, out, rules="torch", merge_lora=True)
        finetuned = TorchClassifier(hidden).eval()
        finetuned.load_state_dict(safetensors.torch.load_file(out), strict=True)
        torch_shifted = torch_logits(finetuned, shifted(x_test))
    numbers["PyTorch fine-tuned accuracy, shifted task"] = accuracy(
        torch_shifted, y_test
    )
    numbers["PyTorch vs Keras: largest logit difference"] = float(
        np.max(np.abs(torch_shifted - logits))
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
