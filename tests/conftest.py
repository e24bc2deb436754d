import os

os.environ.setdefault("KERAS_BACKEND", "jax")

# The tests compile hundreds of small programs: XLA's CPU backend at its
# lowest optimisation level compiles them about 30% faster, and both sides
# of every comparison compile so: this process and the Python processes
# tests start, which inherit the flag (a model saved here predicts the
# same bits when loaded there). The distributed scenarios set flags of
# their own; the benchmarks and examples compile as users do.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
).strip()

import hypothesis  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Bounded for CI; `pytest --hypothesis-profile=long` for hundreds of cases.
hypothesis.settings.register_profile(
    "ci",
    max_examples=16,
    deadline=None,
    derandomize=True,
    print_blob=True,
    # No shrinking: each example compiles; the blob reproduces a failure.
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
hypothesis.settings.register_profile("long", max_examples=300, deadline=None)
hypothesis.settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # Without Keras' `gc.collect()` (0.15 s in a test process, before every
    # test: 40 s of the README's test command); the tests that measure live
    # arrays collect first.
    keras.backend.clear_session(free_memory=False)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def data(*shape, seed=0, dtype="float32"):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def variable_values(tree):
    """A PyTree of Keras variables (`layer.params`) as NumPy arrays."""
    return jax.tree.map(lambda v: np.asarray(v.value), tree)


def onnx_outputs(model, x, path):
    """`model` exported to ONNX at `path`, run by onnxruntime on `x`."""
    import onnxruntime

    model.export(str(path), format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def keras_grads(layer, inputs, training=False):
    """Gradients of sum(outputs**2) w.r.t. the layer's trainable weights."""
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable):
        outputs, _ = layer.stateless_call(
            trainable, non_trainable, inputs, training=training
        )
        return jnp.sum(outputs**2)

    return jax.grad(loss)(trainable)


def flax_grads(module, variables, inputs, **kwargs):
    def loss(params):
        outputs = module.apply(
            {**variables, "params": params}, inputs, **kwargs
        )
        return jnp.sum(outputs**2)

    return jax.tree_util.tree_leaves(jax.grad(loss)(variables["params"]))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    a_leaves, a_def = jax.tree_util.tree_flatten(a)
    b_leaves, b_def = jax.tree_util.tree_flatten(b)
    assert a_def == b_def, f"{a_def} != {b_def}"
    for x, y in zip(a_leaves, b_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol)
