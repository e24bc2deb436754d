"""PyTorch only: DLPack, the autograd bridge and its compiled functions."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import torch

from keras_flax import FlaxLayer
from keras_flax import _backends
from tests import modules
from tests.conftest import assert_trees_close
from tests.conftest import data


def _torch_grads(tree):
    return jax.tree.map(lambda v: v.value.grad.numpy(), tree)


def test_outputs_and_gradients_equal_jax():
    module = modules.BatchNormOnly()
    layer = FlaxLayer(module, seed=0)
    x_np = data(8, 5)
    layer(x_np)  # build
    variables = layer.flax_variables

    x = torch.tensor(x_np, requires_grad=True)
    out = layer(x, training=True)
    (out**2).sum().backward()

    def loss(params, x):
        out, _ = module.apply(
            {**variables, "params": params},
            x,
            training=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(out**2), out

    (grads, x_grad), want_out = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x_np
    )
    np.testing.assert_allclose(
        out.detach().numpy(), want_out, rtol=1e-5, atol=1e-6
    )
    assert_trees_close(_torch_grads(layer.params["params"]), grads, 1e-4)
    np.testing.assert_allclose(x.grad.numpy(), x_grad, rtol=1e-4, atol=1e-6)


def test_tensors_cross_through_dlpack_without_copies():
    t = torch.randn(4, 5)
    assert _backends.to_jax(t).unsafe_buffer_pointer() == t.data_ptr()
    a = jnp.ones((4, 5))
    assert _backends._jax_to_torch(a).data_ptr() == a.unsafe_buffer_pointer()

    layer = FlaxLayer(modules.MLP(), seed=0)
    layer(data(2, 5))
    weight = layer.trainable_variables[0].value
    assert _backends.to_jax(weight).unsafe_buffer_pointer() == (
        weight.data_ptr()
    )


def test_compiled_once_per_signature_in_fit_and_predict():
    traces = modules.TraceCounter()
    layer = FlaxLayer(modules.BatchNormDropout(), method=traces, seed=0)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile("adam", "mse")
    model.fit(data(32, 5), data(32, 2), batch_size=8, epochs=1, verbose=0)
    trained = traces.count
    model.fit(data(32, 5), data(32, 2), batch_size=8, epochs=2, verbose=0)
    assert traces.count == trained  # no step traced again
    model.predict(data(16, 5), batch_size=8, verbose=0)
    predicted = traces.count
    assert predicted == trained + 1  # one trace for inference
    model.predict(data(16, 5), batch_size=8, verbose=0)
    assert traces.count == predicted
