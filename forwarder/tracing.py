"""Spans for the forwarder's own steps under ``ddtrace-run``; nothing at all when ddtrace is not loaded.

Stable names, each tagged with the task id (``celery.id``, as ddtrace tags its ``celery.run`` span):
``forwarder.plan`` (checking the request), ``forwarder.model`` (the model POST: status code and answer size,
never a body), ``forwarder.hook`` (resource: the hook's name; ``forwarder.hook.outcome``). They nest under
ddtrace's ``celery.run`` span of the task, and ddtrace's own ``requests.request`` span nests under
``forwarder.model``. No request, answer, URL query or credential is put on a span.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PLAN, MODEL, HOOK = "forwarder.plan", "forwarder.model", "forwarder.hook"


@contextmanager
def step(name: str, task_id: str | None, resource: str | None = None) -> Iterator[Any]:
    """A span named ``name`` around the block (yields it, or None when not tracing); errors are flagged."""
    trace = sys.modules.get("ddtrace.trace")
    if trace is None:
        yield None
        return
    with trace.tracer.trace(name, resource=resource or name) as span:
        if task_id:
            span.set_tag("celery.id", task_id)
        yield span


def tag(span: Any, **tags: Any) -> None:
    """Set tags on ``span`` when there is one."""
    if span is not None:
        for key, value in tags.items():
            span.set_tag(key, value)
