"""Optax in `model.compile`: `OptaxOptimizer`, a Keras optimizer whose
whole update is an `optax.GradientTransformation`'s.

The Optax state lives in Keras optimizer variables, one per array leaf, so
Keras saves, loads, restores and shards it as its own. Each step hands
Optax the gradients and parameters as dicts keyed by the Keras variables'
paths (our Flax-path names: `"mlp/Dense_0/kernel"`), which `optax.masked`
and `optax.multi_transform` labels can key on.
"""

import math
from collections.abc import Sequence
from typing import Any
from typing import Never

import jax
import keras
import optax

from keras_flax import _backends
from keras_flax import _serialization
from keras_flax._errors import describe
from keras_flax._model import PyTree


@keras.saving.register_keras_serializable(package="keras_flax")
class OptaxOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer running an Optax gradient transformation.

    Args:
        transformation: an `optax.GradientTransformation` (also
            `GradientTransformationExtraArgs`), or a factory returning one
            when called with `**kwargs` (`optax.adamw`, or your own
            importable function building a chain). A factory with
            JSON-able arguments is saved with the model; a ready
            transformation is not (`save_weights` works for both).
        name: the optimizer's name (the prefix of its variables).
        **kwargs: the factory's arguments.

    Raises:
        ValueError: the Keras backend is not JAX.
        TypeError: `transformation` is neither a transformation nor a
            factory returning one, or `kwargs` are given with a ready
            transformation.

    Examples:
        >>> import keras, optax
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> model.compile(
        ...     optimizer=OptaxOptimizer(
        ...         optax.adamw, learning_rate=1e-3, weight_decay=1e-4
        ...     ),
        ...     loss="mse",
        ... )
        >>> model.optimizer.transformation is not None
        True
    """

    def __init__(
        self, transformation: Any, /, *, name: str = "optax", **kwargs: Any
    ) -> None:
        if _backends.name() != "jax":
            raise ValueError(optax_backend(_backends.name()))
        factory, tx = None, _transformation(transformation)
        if tx is not None:
            if kwargs:
                raise TypeError(
                    optax_kwargs_with_transformation(sorted(kwargs))
                )
        elif callable(transformation):
            factory, result = transformation, transformation(**kwargs)
            tx = _transformation(result)
            if tx is None:
                raise TypeError(optax_factory_result(transformation, result))
        else:
            raise TypeError(optax_transformation(transformation))
        # Keras' own learning rate is unused: Optax's schedules apply.
        super().__init__(learning_rate=math.nan, name=name)
        self._factory = factory
        self._tx = tx
        self._kwargs = kwargs
        self._treedef: Any = None
        self._state_variables = []
        self._learning_rate_variable = None
        self._trained = _Trained([])
        self._names = []

    def build(self, variables: PyTree) -> None:
        if self.built:
            return
        names = [v.path for v in variables]
        if len(set(names)) != len(names):
            raise ValueError(optax_duplicate_paths(names))
        super().build(variables)
        # Not a list attribute: Keras would track it as its own variables.
        self._trained = _Trained(variables)
        self._names = names
        by_name = dict(zip(self._names, variables, strict=True))
        state = self._tx.init({n: v.value for n, v in by_name.items()})
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(state)
        for path, leaf in leaves:
            variable = self._state_variable(path, leaf, by_name)
            self._state_variables.append(variable)
            if _key_names(path)[-2:] == ["hyperparams", "learning_rate"]:
                # `optax.inject_hyperparams`: the schedule's current value.
                self._learning_rate_variable = variable

    def _state_variable(self, path: Any, leaf: Any, by_name: Any) -> Any:
        """A Keras variable holding one leaf of the Optax state; laid out
        (sharded) as the parameter it belongs to, where it has one."""
        value = leaf

        def initializer(shape: Sequence[int | None], dtype: Any = None) -> Any:
            return value

        names = _key_names(path)
        owner = next((n for n in names if n in by_name), None)
        if owner is not None and tuple(by_name[owner].shape) != leaf.shape:
            owner = None
        # Named by its place in the state; Keras prefixes a parameter's
        # own state with the parameter's path ("model_mlp_..._kernel_0_mu").
        parts = [str(n) for n in names if n != owner]
        name = "_".join(parts).replace("/", "_") or "state"
        # Keras annotates `initializer` as a string; it takes a function
        # `(shape, dtype) -> array` too (its docs, and its own optimizers).
        if owner is not None:
            return self.add_variable_from_reference(
                by_name[owner],
                name=name,
                initializer=initializer,  # pyright: ignore[reportArgumentType]
            )
        return self.add_variable(
            shape=leaf.shape,
            dtype=leaf.dtype,
            initializer=initializer,  # pyright: ignore[reportArgumentType]
            name=name,
        )

    def apply(self, grads: Any, trainable_variables: Any = None) -> None:
        grads = list(grads)
        if trainable_variables is None:
            trainable_variables = self._trained.variables
        else:
            trainable_variables = list(trainable_variables)
            self.build(trainable_variables)
        params = {
            n: v.value
            for n, v in zip(self._names, trainable_variables, strict=True)
        }
        grads = dict(zip(self._names, grads, strict=True))
        state = self._treedef.unflatten(
            [v.value for v in self._state_variables]
        )
        updates, state = self._tx.update(grads, state, params)
        new_params: Any = optax.apply_updates(params, updates)
        for name, variable in zip(
            self._names, trainable_variables, strict=True
        ):
            variable.assign(new_params[name])
        for variable, value in zip(
            self._state_variables,
            self._treedef.flatten_up_to(state),
            strict=True,
        ):
            variable.assign(value)
        self.iterations.assign_add(1)  # pyright: ignore (a Keras variable)

    @property
    def transformation(self) -> optax.GradientTransformation:
        """The `optax.GradientTransformation` this optimizer runs."""
        return self._tx

    @property
    def learning_rate(self) -> Any:
        """The current learning rate of an `optax.inject_hyperparams`
        transformation (the Keras variable holding it), else NaN."""
        if self._learning_rate_variable is not None:
            return self._learning_rate_variable
        return math.nan

    @learning_rate.setter
    def learning_rate(self, value: Any) -> Never:
        raise ValueError(optax_learning_rate_set(value))

    def get_config(self) -> dict[str, Any]:
        if self._factory is None:
            raise TypeError(optax_not_serializable(self._tx))
        return {
            "name": self.name,
            "factory": _serialization.serialize_value(self._factory, "factory"),
            "kwargs": _serialization.serialize_value(self._kwargs, "kwargs"),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "OptaxOptimizer":
        factory = _serialization.deserialize_factory(
            config.get("factory"), "optimizer.factory"
        )
        kwargs = _serialization.deserialize_value(
            config.get("kwargs", {}), "optimizer.kwargs"
        )
        if not callable(factory) or not isinstance(kwargs, dict):
            raise ValueError(
                "The saved config of an OptaxOptimizer must name a factory "
                "function and a dict of its arguments. Received: "
                f"{config!r}. The file was altered or is corrupted; it was "
                "not loaded."
            )
        return cls(factory, name=config.get("name", "optax"), **kwargs)


def optax_backend(backend_name: str) -> str:
    return (
        "`OptaxOptimizer` runs Optax, on the JAX backend only. Received: "
        f"backend={backend_name!r}. Fix: set `KERAS_BACKEND=jax` before "
        "importing Keras, or use a Keras optimizer (`keras.optimizers.Adam`)."
    )


def optax_transformation(value: Any) -> str:
    return (
        "`transformation` must be an `optax.GradientTransformation` or a "
        "function returning one. Received: transformation="
        f"{describe(value)}. Fix: e.g. `OptaxOptimizer(optax.adam(1e-3))` or "
        "`OptaxOptimizer(optax.adam, learning_rate=1e-3)`."
    )


def optax_factory_result(factory: Any, result: Any) -> str:
    return (
        "`transformation`, called with the given keyword arguments, must "
        "return an `optax.GradientTransformation`. Received: "
        f"transformation={describe(factory)}, which returned "
        f"{describe(result)}. Fix: pass the factory of a transformation "
        "(`optax.adamw`) or your function that returns `optax.chain(...)`."
    )


def optax_kwargs_with_transformation(names: Any) -> str:
    return (
        "Keyword arguments go to a factory; a ready transformation takes "
        f"none. Received: an `optax.GradientTransformation` and {names}. "
        "Fix: pass the factory and its arguments, "
        "`OptaxOptimizer(optax.adamw, learning_rate=1e-3)`, or the "
        "transformation alone, `OptaxOptimizer(optax.adamw(1e-3))`."
    )


def optax_duplicate_paths(paths: Sequence[str]) -> str:
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    return (
        "`OptaxOptimizer` keys parameters by their Keras variable paths, "
        f"which must be unique. Received: paths {repeated} more than once. "
        "Fix: give the layers holding them distinct names."
    )


def optax_learning_rate_set(value: Any) -> str:
    return (
        "The learning rate of an `OptaxOptimizer` is Optax's: Keras cannot "
        f"set it. Received: learning_rate={describe(value)} (e.g. from "
        "`keras.callbacks.LearningRateScheduler`). Fix: give the schedule "
        "to Optax, `OptaxOptimizer(optax.inject_hyperparams(optax.adam)("
        "learning_rate=optax.cosine_decay_schedule(1e-3, 1000)))`, and drop "
        "the callback."
    )


def optax_not_serializable(transformation: Any) -> str:
    return (
        "An `OptaxOptimizer` made from a ready transformation cannot be "
        "saved in a model file. Received: transformation="
        f"{type(transformation).__name__}(...), which has no import path. "
        "Fix: pass an importable factory and JSON-able arguments, "
        "`OptaxOptimizer(optax.adamw, learning_rate=1e-3)` (or your own "
        "top-level function building the chain); `model.save_weights(...)` "
        "works in any case."
    )


class _Trained:
    """The model variables the optimizer was built for."""

    def __init__(self, variables: PyTree) -> None:
        self.variables = list(variables)


def _key_names(path: Any) -> list[Any | None]:
    """The dict keys, attribute names and indices of a key path."""
    return [
        getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        for k in path
    ]


def _transformation(value: Any) -> Any:
    """`value` as an `optax.GradientTransformation`, or None.

    `optax.MultiSteps` (gradient accumulation) is a wrapper object: its
    transformation is `gradient_transformation()`.
    """
    if isinstance(value, optax.MultiSteps):
        value = value.gradient_transformation()
    if isinstance(value, optax.GradientTransformation):
        return value
    return None


class LearningRateLogger(keras.callbacks.Callback):
    """Logs the learning rate of an `OptaxOptimizer` at each epoch's end.

    With a transformation made by `optax.inject_hyperparams`, the current
    learning rate goes into the epoch's logs as `learning_rate`, so the
    progress bar shows it and `History` records it (as Keras does for its
    own optimizers under `ReduceLROnPlateau`). Pass it to `fit`:
    `model.fit(..., callbacks=[keras_flax.LearningRateLogger()])`.

    Examples:
        >>> import keras, numpy as np, optax
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        >>> model.compile(OptaxOptimizer(tx), "mse")
        >>> history = model.fit(
        ...     np.ones((8, 3)), np.ones((8, 1)), verbose=0,
        ...     callbacks=[LearningRateLogger()],
        ... )
        >>> [round(float(rate), 3) for rate in history.history["learning_rate"]]
        [0.1]
    """

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        optimizer = getattr(self.model, "optimizer", None)
        found = getattr(optimizer, "_learning_rate_variable", None)
        if logs is not None and found is not None:
            logs["learning_rate"] = float(found.numpy())
