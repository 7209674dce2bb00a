"""Under ``ddtrace-run``: continue a producer's trace, and flag a failed task's span as an error.

- A producer that sends Datadog propagation headers with its task (ddtrace's Celery integration puts them
  in the message's ``headers``) gets the worker's ``celery.run`` span in its own trace: ddtrace reads them
  only with ``DD_CELERY_DISTRIBUTED_TRACING``, which this turns on unless the variable says otherwise.
- ddtrace's Celery integration leaves a failure unflagged when the task lists it in ``Task.throws``
  (Celery's "expected" failures, logged in one line), which every error of ours is: without this, a worker
  whose every task failed would show no error in APM.
Nothing is imported when ddtrace is not loaded.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, Task, states

from forwarder.extensions.base import Extension
from forwarder.settings import Settings

logger = logging.getLogger(__name__)


class FlagFailuresInTrace(Extension):
    """Continue producers' traces; mark the running task's root span as an error when the task failed."""

    def install(self, app: Celery, settings: Settings) -> None:
        ddtrace = sys.modules.get("ddtrace")
        if ddtrace is None or "DD_CELERY_DISTRIBUTED_TRACING" in os.environ:
            return
        try:
            ddtrace.config.celery["distributed_tracing"] = True
        except Exception as exc:  # an older or newer ddtrace without the setting: tracing still works
            logger.warning("could not turn on ddtrace's Celery distributed tracing: %s: %s", type(exc).__name__, exc)

    def after_task(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        if state == states.FAILURE and isinstance(retval, BaseException):
            mark_trace_error(retval)


def mark_trace_error(exc: BaseException) -> None:
    """Flag the current root span with ``exc``, if ddtrace is loaded and tracing."""
    trace = sys.modules.get("ddtrace.trace")
    span = trace.tracer.current_root_span() if trace is not None else None
    if span is not None:
        span.set_exc_info(type(exc), exc, exc.__traceback__)
