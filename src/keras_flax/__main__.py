"""The `keras-flax` command: `keras-flax demo [--epochs N ...]`."""

import sys
from typing import Any


def main(argv: Any = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: keras-flax demo [--epochs N] [--batch-size N] [--seed N] "
            "[--api linen|nnx]"
        )
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "demo":
        print(f"keras-flax: unknown command {command!r}; try: keras-flax demo")
        return 2
    import keras_flax  # noqa: F401  (selects the JAX backend first)
    from keras_flax import demo

    demo.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
