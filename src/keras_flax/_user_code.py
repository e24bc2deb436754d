"""The boundary with the user's code.

Every call into the user's model (a module's `init` / `apply` / method,
`call_fn`, `init_fn`) goes through `user_code`, which re-raises what it
raises as `UserCodeError`, so that a bug of ours is never taken for the
model's refusal. Where the layer tries the model (an input size, a shape
probe), `attempt` returns the refusal as a value (`Refused`) that the
caller decides on; elsewhere a `UserCodeError` is caught only where a
message of ours reports it. The layer's entry points
(`raises_user_errors`) re-raise the original to the user, as the built-in
layers raise it.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import TypeVar

T = TypeVar("T")


class UserCodeError(Exception):
    """What the user's model raised, carried out of our code.

    Every call into the user's model (a module's `init` / `apply` / method,
    `call_fn`, `init_fn`) goes through `user_code`, which re-raises what
    it raises as this, so that our own bugs are never taken for the
    module's refusal. The layer re-raises `error`, the original, to the
    user.

    Attributes:
        error: the exception the user's code raised.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def user_code(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` (the user's code), raising what it raises as `UserCodeError`."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except UserCodeError:
            raise  # the user's code calling ours calling the user's
        except Exception as error:
            raise UserCodeError(error) from error

    return call


def raises_user_errors(method: Callable[..., T]) -> Callable[..., T]:
    """`method` (a layer's entry point), re-raising to the user the
    original of any `UserCodeError`: the error of their model, as the
    built-in layers raise it."""

    @functools.wraps(method)
    def entry(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except UserCodeError as wrapped:
            raise wrapped.error.with_traceback(
                wrapped.error.__traceback__
            ) from None

    return entry


@dataclasses.dataclass(frozen=True)
class Refused:
    """What the user's model raised on a trial call.

    Attributes:
        error: the exception it raised.
    """

    error: Exception


def attempt(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | Refused:
    """A trial call of the user's model (an input size, a shape probe):
    `fn`'s result, or what the model raised as a `Refused` value, which
    the caller decides on. Errors of our own code propagate."""
    try:
        return fn(*args, **kwargs)
    except UserCodeError as refused:
        return Refused(refused.error)


def result(outcome: T | Refused) -> T:
    """The result of a trial; a refusal is raised to the user as the
    model's own error (see `raises_user_errors`)."""
    if isinstance(outcome, Refused):
        raise UserCodeError(outcome.error) from outcome.error
    return outcome
