"""The worker's own exceptions, under one root, ``ForwarderError``.

The gateways have theirs (``gateways.errors.GatewayError``): with one root per package, a hook runner or a
metric tells "ours, expected" (either root) from a bug (anything else) by type.
"""

from __future__ import annotations


class ForwarderError(Exception):
    """Root of every error the forwarder raises on purpose."""


#: A variable whose name holds one of these words is a secret: its value is never shown.
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN")


def is_secret_variable(name: str) -> bool:
    """Whether the variable ``name`` holds a secret (error messages and the configuration line hide it)."""
    return any(word in name.upper() for word in SECRET_WORDS)


class ConfigError(ForwarderError):
    """An environment variable has an invalid value; the worker must not start."""

    def __init__(self, variable: str, value: str | None, reason: str) -> None:
        """``value`` None: the message shows no value (a variable this worker does not know may be a secret)."""
        self.variable = variable
        if value is None:
            super().__init__(f"{variable} {reason}")
            return
        shown = value if len(value) <= 80 else value[:77] + "..."
        # Never echo a secret back: name the variable, and show the value only for non-secrets.
        if is_secret_variable(variable):
            shown = "<hidden>"
        super().__init__(f"{variable}={shown!r} {reason}")


class MalformedRequest(ForwarderError):
    """The task's arguments are not a request the forwarder can send (fails before any HTTP call)."""


class ResultTooLarge(ForwarderError):
    """The task's result is larger than FORWARDER_MAX_RESULT_BYTES: the task fails instead of storing it."""


class HookError(ForwarderError):
    """A post-inference hook failed (logged and counted; never changes the task's result)."""
