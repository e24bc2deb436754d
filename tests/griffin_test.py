"""A real third-party linen model: Google's recurrentgemma Griffin, whose
configuration is a NamedTuple of enums (`GriffinConfig`).

recurrentgemma 1.0.1 pins `numpy<2.4` and `absl-py<2` yet runs with newer
ones, so it is not a test extra: `.ci/run` installs it `--no-deps` with
`einops jaxtyping 'typeguard<3' sentencepiece` for the slow tests.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_flax import FlaxLayer

pytestmark = pytest.mark.slow


def _griffin():
    import recurrentgemma.jax as griffin
    from recurrentgemma import common

    config = griffin.GriffinConfig(
        vocab_size=32,
        width=16,
        mlp_expanded_width=32,
        num_heads=2,
        block_types=(
            common.TemporalBlockType.RECURRENT,
            common.TemporalBlockType.ATTENTION,
        ),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=8,
        logits_soft_cap=30.0,
        lru_width=16,
        scan_type=common.ScanType.LINEAR_NATIVE,
    )
    return griffin.Griffin(config, gradient_checkpointing=False)


def logits(module, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
    out, _ = module(tokens, positions, return_cache=False)
    return out


TOKENS = jnp.asarray(
    np.random.default_rng(0).integers(0, 32, (2, 8)).astype("int32")
)


def _model(module, variables):
    layer = FlaxLayer(module, method=logits, variables=variables)
    inputs = keras.Input((8,), dtype="int32", batch_size=2)
    return keras.Model(inputs, layer(inputs)), layer


def test_griffin_predicts_trains_and_reloads_as_plain_flax(tmp_path):
    module = _griffin()
    variables = module.init(jax.random.PRNGKey(0), TOKENS, method=logits)
    model, layer = _model(module, variables)
    expected = module.apply(variables, TOKENS, method=logits)
    np.testing.assert_allclose(
        model.predict(TOKENS, verbose=0), expected, rtol=1e-5, atol=1e-5
    )

    # One SGD step, as `jax.grad` of the same loss takes it.
    def loss(params):
        out = module.apply({"params": params}, TOKENS, method=logits)
        return jnp.mean(out**2)

    grads = jax.grad(loss)(variables["params"])
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.train_on_batch(TOKENS, np.zeros(expected.shape, "float32"))
    for got, want in zip(
        jax.tree.leaves(layer.flax_variables["params"]),
        jax.tree.leaves(stepped),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # Saved with its NamedTuple-of-enums configuration; loaded in safe mode.
    path = tmp_path / "griffin.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[1].module == module
    np.testing.assert_array_equal(
        loaded.predict(TOKENS, verbose=0), model.predict(TOKENS, verbose=0)
    )
