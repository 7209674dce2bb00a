"""Once a task is over, free the exception it ended with, so no failed task keeps its frames.

A traceback keeps every frame it passed through alive with its locals (the request, the model's answer).
``task_done`` comes after everything that reads the exception (the stored failure, the hooks, Celery's
retry message, tracing) and runs for every outcome, RETRY included.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Retry

from forwarder.extensions.base import Extension
from gateways.errors import release_exception


class ReleaseExceptions(Extension):
    """Clear the frames of the exception a task ended with (and of the one behind a retry)."""

    def task_done(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        if isinstance(retval, BaseException):
            release_exception(retval)
        if isinstance(retval, Retry):
            release_exception(retval.exc)  # the failure that caused it
            # Celery's Retry passes itself into its own args: a reference cycle that keeps ``sig``, the
            # retried task's signature with its whole request, until the cyclic collector runs.
            retval.args = tuple(arg for arg in retval.args if arg is not retval)
            retval.sig = None
