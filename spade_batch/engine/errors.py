"""Ray's wrappers around our own exceptions: the error a stage raised, out of the task and actor errors
that carry it to the driver. Imports no Ray (it matches Ray's classes by name), so the CLI can use it cheaply."""

from __future__ import annotations


def user_error(error: BaseException) -> BaseException:
    """The exception our code raised, out of Ray's wrappers: a RayTaskError's cause (a failed task or actor
    method: Ray Data passes the stage's own exception on, see engine.runtime), a UserCodeException's cause."""
    current = error
    for _ in range(32):
        names = {cls.__name__ for cls in type(current).__mro__}
        cause = getattr(current, "cause", None)
        if "RayTaskError" in names and isinstance(cause, BaseException) and cause is not current:
            current = cause
        elif "UserCodeException" in names and current.__cause__ is not None:
            current = current.__cause__
        else:
            return current
    return current
