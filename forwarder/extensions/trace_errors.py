"""Under ``ddtrace-run``, flag a failed task's span as an error, with the exception's type and stack.

ddtrace's Celery integration leaves a failure unflagged when the task lists it in ``Task.throws``
(Celery's "expected" failures, logged in one line), which every error of ours is: without this, a worker
whose every task failed would show no error in APM. Nothing is imported when ddtrace is not loaded.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Task, states

from forwarder.extensions.base import Extension


class FlagFailuresInTrace(Extension):
    """Mark the running task's root span as an error when the task failed."""

    def after_task(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        if state == states.FAILURE and isinstance(retval, BaseException):
            mark_trace_error(retval)


def mark_trace_error(exc: BaseException) -> None:
    """Flag the current root span with ``exc``, if ddtrace is loaded and tracing."""
    trace = sys.modules.get("ddtrace.trace")
    span = trace.tracer.current_root_span() if trace is not None else None
    if span is not None:
        span.set_exc_info(type(exc), exc, exc.__traceback__)
