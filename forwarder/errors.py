"""The worker's exceptions, under one root, and how a handled exception lets go of what it holds."""

from __future__ import annotations

import traceback


class ForwarderError(Exception):
    """Root of every error the forwarder raises on purpose."""


class ConfigError(ForwarderError):
    """An environment variable has an invalid value; the worker must not start."""

    def __init__(self, variable: str, value: str, reason: str) -> None:
        self.variable = variable
        shown = value if len(value) <= 80 else value[:77] + "..."
        # Never echo a secret back: name the variable, and show the value only for non-secrets.
        if "PASSWORD" in variable or "SECRET" in variable or "TOKEN" in variable:
            shown = "<hidden>"
        super().__init__(f"{variable}={shown!r} {reason}")


class MalformedRequest(ForwarderError):
    """The task's arguments are not a request the forwarder can send (fails before any HTTP call)."""


class ModelNotReady(ForwarderError):
    """The model server did not become ready within FORWARDER_READY_TIMEOUT."""


class ModelConnectionError(ForwarderError):
    """The model server could not be reached (refused, reset, connect timeout): the task is retried."""


class ModelTimeout(ForwarderError):
    """The model server accepted the request but did not answer within FORWARDER_MODEL_READ_TIMEOUT."""


class ModelResponseError(ForwarderError):
    """The model server answered with a body that is not JSON."""


class HookError(ForwarderError):
    """A post-inference hook failed (logged and counted; never changes the task's result)."""


def release_exception(exc: BaseException | None) -> None:
    """Free what an exception holds once it has been handled (logged, stored, retried).

    A traceback keeps every frame it passed through alive, with their locals: the request, the model's
    answer, a response buffer. ``except ... as exc`` followed by ``raise Other(...) from exc`` also leaves a
    cycle (frame -> exc -> traceback -> frame) that only the cyclic collector frees, late (a gen-2 pass),
    so one failed task's buffers could outlive it by minutes. This clears the finished frames of the
    exception and of every exception chained to it (``__cause__``, ``__context__``) and drops the
    tracebacks. Frames still running (the caller's) are left alone. Celery's own clearing
    (``celery.app.trace.traceback_clear``) covers only the outermost traceback.
    """
    pending = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current.__traceback__ = None
        pending += (current.__cause__, current.__context__)
