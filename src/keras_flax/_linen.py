"""FlaxLayer: a Flax linen module adapted to the `JaxLayer` protocol.

`LinenModel` turns a module and its forward method into `init_fn(rng,
inputs)` and `call_fn(params, state, rng, inputs, training)`; `FlaxLayer`
adds what is Flax-specific on top of `JaxLayer`: names without the implied
`params` collection, RNG streams, and `flax_variables`.
"""

import collections.abc

import flax
import flax.linen as nn
import jax

from keras_flax import _errors

# Collections never held as state: what modules `sow`.
_NEVER_STATE = ("params", "intermediates")


def _is_sown(collection):
    """Whether a collection holds `sow` output: tuples of values."""
    leaves = jax.tree_util.tree_flatten_with_path(collection)[0]
    return bool(leaves) and all(
        any(isinstance(k, jax.tree_util.SequenceKey) for k in path)
        for path, _ in leaves
    )


class LinenModel:
    """A linen module and method as `init_fn` and `call_fn`.

    Args:
        module: the `flax.linen.Module` instance.
        method: None, a method name, or a function taking the module first.
        takes_training: whether the method takes `training`.
        variables: initial variables (`Module.init()` format) or None.
    """

    def __init__(self, module, method, takes_training, variables=None):
        self.module = module
        self.method = method
        self.takes_training = takes_training
        self.sown = set()
        self.params = self.state = None
        if variables is not None:
            self.params, self.state = self.split(_checked(variables))

    def split(self, variables):
        """`Module.init` output -> `(params, state)` as `JaxLayer` holds them.

        `params` keeps its collection key (`{"params": ...}`), as
        `keras.layers.FlaxLayer` does; boxed partitioning metadata is
        unwrapped and sown collections are dropped.
        """
        variables = dict(nn.meta.unbox(flax.core.unfreeze(variables)))
        self.sown |= {k for k, v in variables.items() if _is_sown(v)}
        params = (
            {"params": variables["params"]} if "params" in variables else {}
        )
        state = {
            k: v
            for k, v in variables.items()
            if k not in _NEVER_STATE and k not in self.sown
        }
        return params, state

    def _training_kwargs(self, training):
        return {"training": training} if self.takes_training else {}

    def init(self, rng, inputs):
        variables = self.module.init(
            rng, inputs, method=self.method, **self._training_kwargs(True)
        )
        return self.split(variables)

    def apply(self, params, state, rng, inputs, training):
        outputs, mutated = self.module.apply(
            {**params, **state},
            inputs,
            rngs=rng,
            method=self.method,
            mutable=nn.DenyList([*_NEVER_STATE, *sorted(self.sown)]),
            **self._training_kwargs(training),
        )
        return outputs, {name: mutated.get(name, state[name]) for name in state}


def _checked(variables):
    if not isinstance(variables, collections.abc.Mapping) or not all(
        isinstance(v, collections.abc.Mapping) for v in variables.values()
    ):
        raise TypeError(_errors.variables_not_mapping(variables))
    return variables


def variables_in_init_format(params, state):
    """`{"params": ..., **collections}`, as `Module.init()` returns."""
    return {**(params or {}), **(state or {})}
