"""Spans for the forwarder's own steps under ``ddtrace-run`` with tracing on; nothing at all otherwise.

Only under ``ddtrace-run`` (its bootstrap is loaded before this module): ddtrace imported for another reason
(the metrics client comes from ``ddtrace.vendor``) is no reason to build spans, nor to send them to an agent.

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


#: ``ddtrace-run`` loads its bootstrap before any of the worker's modules.
UNDER_DDTRACE_RUN = "ddtrace.bootstrap.preload" in sys.modules


def tracer() -> Any:
    """ddtrace's tracer when this process runs under ``ddtrace-run`` with tracing on; else None."""
    if not UNDER_DDTRACE_RUN:
        return None
    trace = sys.modules.get("ddtrace.trace")
    return trace.tracer if trace is not None and trace.tracer.enabled else None


@contextmanager
def step(name: str, task_id: str | None, resource: str | None = None) -> Iterator[Any]:
    """A span named ``name`` around the block (yields it, or None when not tracing); errors are flagged."""
    active = tracer()
    if active is None:
        yield None
        return
    with active.trace(name, resource=resource or name) as span:
        if task_id:
            span.set_tag("celery.id", task_id)
        yield span


def tag(span: Any, **tags: Any) -> None:
    """Set tags on ``span`` when there is one."""
    if span is not None:
        for key, value in tags.items():
            span.set_tag(key, value)
