"""The running task's model call (status code, seconds), noted once on the task's own request.

Celery keeps a request per task, thread and greenlet, so nothing here is shared between tasks in flight.
The task body notes the call; the extensions (the task log line, the metrics) read it in ``task_done``.
"""

from __future__ import annotations

from typing import Any

from celery import current_task

STATUS_KEY = "forwarder_model_status"
SECONDS_KEY = "forwarder_model_seconds"


def note_model_call(status_code: int | None, seconds: float) -> None:
    """Record the running task's model call (``status_code`` None: no answer); no-op outside a task."""
    request = current_task.request if current_task else None  # Celery's public proxy: falsy outside a task
    if request is not None:
        setattr(request, STATUS_KEY, status_code)
        setattr(request, SECONDS_KEY, seconds)


def model_call(request: Any) -> tuple[int | None, float | None]:
    """The (status code, seconds) noted on ``request``; (None, None) when the model was not called."""
    return getattr(request, STATUS_KEY, None), getattr(request, SECONDS_KEY, None)
