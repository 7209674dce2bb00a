"""The forward task, wire-compatible with llm-engine's celery forwarder.

Producers send ``[request_dict, arrival_timestamp, *ignored]`` (llm-engine always adds
``return_pickled``) plus optional tracing kwargs, under either of two names; both run the same body
and both retry connection failures with bounded exponential backoff (llm-engine's legacy name never
retried). After the result is stored, ``ForwardTask.after_return`` rewrites a failure into llm-engine's
error meta and runs the post-inference hooks.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from celery import Task, states
from celery.exceptions import InvalidTaskError, Reject, Retry
from celery.worker import state as worker_state
from celery.worker.request import Request

from forwarder import deps
from forwarder.errors import ForwarderError, MalformedRequest, release_exception
from forwarder.payload import error_payload, format_trace, plan_request, shape_result

logger = logging.getLogger(__name__)

#: llm-engine's LIRA task name (runnable-image bundles).
TASK_NAME = "ml_serve.celery_service.exec_func"
#: llm-engine's pre-LIRA task name, still sent for legacy bundles.
LEGACY_TASK_NAME = "hosted_model_inference.inference.async_inference.tasks.predict"
TASK_NAMES = (TASK_NAME, LEGACY_TASK_NAME)
#: Default of the request argument, so a task sent without arguments fails as a MalformedRequest.
_NO_REQUEST: Any = object()


def exec_func(payload: Any = _NO_REQUEST, arrival_timestamp: Any = None, *ignored_args: Any, **kwargs: Any) -> Any:
    """Forward one request to the model and return the result to store.

    ``arrival_timestamp`` and further positional args (``return_pickled``) are accepted and unused;
    tracing kwargs are ignored (ddtrace propagates context through Celery's headers itself).
    """
    if payload is _NO_REQUEST:
        raise MalformedRequest("the task has no arguments: expected [request, arrival_timestamp, return_pickled]")
    current = deps.current()
    plan = plan_request(payload, current.settings.result_format)
    answer = current.model.predict(plan.body)
    return shape_result(answer.body, answer.status_code, plan)


class CheckedRequest(Request):
    """Celery's Request, refusing a message whose body is not ``[args (array), kwargs (object), embed]``.

    Celery unpacks the body outside its own error handling: a body like ``"text"`` or ``[1, 2]`` raised
    ValueError out of the consumer, the worker exited ("Unrecoverable error"), the message went back
    to the queue, and every replica that took it crashed in turn. As InvalidTaskError it is logged and
    dropped like any other invalid message, and, when its ``id`` header names a task, a FAILURE is
    stored for it (as Celery does for an unknown task name), so the producer gets an answer instead of
    PENDING until the task expires.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
            if not isinstance(self._args, (list, tuple)) or not isinstance(self._kwargs, dict):
                raise InvalidTaskError("malformed task message: body is not [args (array), kwargs (object), embed]")
        except InvalidTaskError as exc:
            refused = exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            refused = InvalidTaskError(f"malformed task message: {type(exc).__name__}: {exc}")
        else:
            return
        headers = kwargs.get("headers") or getattr(message, "headers", None)
        _store_refusal(kwargs.get("task"), headers, refused)
        raise refused from None


def _store_refusal(task: Task | None, headers: Any, exc: InvalidTaskError) -> None:
    """Store llm-engine's failure meta for a refused message whose task id is known; never raises."""
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if task is None or task.ignore_result or not isinstance(task_id, str) or not task_id:
        return
    try:
        store_failure(task.backend, task_id, exc)
    except Exception as error:  # the message is dropped either way; say why no result was stored
        logger.error("could not store the failure of refused task %s: %s: %s", task_id, type(error).__name__, error)


def store_failure(backend: Any, task_id: str, exc: BaseException, request: Any = None) -> dict[str, str]:
    """Store a FAILURE the way llm-engine's readers expect (``custom`` JSON), keeping the traceback.

    Returns llm-engine's error payload, which the hooks report as the response.
    """
    trace = format_trace(exc)
    payload = error_payload(exc, trace)
    prepared = backend.prepare_exception(exc)
    meta = {"exc_type": prepared["exc_type"], "exc_message": prepared["exc_message"], "custom": json.dumps(payload)}
    backend.store_result(task_id, meta, states.FAILURE, traceback=trace, request=request)
    logger.warning("task %s failed: %s: %s", task_id, type(exc).__name__, exc)
    return payload


class ForwardTask(Task):
    """Base of both task names: llm-engine's failure meta, then hooks, after the result is stored."""

    Request = CheckedRequest

    # Expected failures (model down, malformed request) are reported in the stored result and one
    # log line; Celery logs exceptions listed here without a traceback (and ddtrace would not flag their
    # spans as errors, hence ``mark_trace_error``).
    throws = (ForwarderError,)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Hand a task back to the queue, unrun, if this worker is already shutting down.

        Under gevent, Celery's synchronous consumer keeps starting tasks it reserved (and even takes new
        ones) while a warm shutdown waits for the running ones; each would hold the pod up to a whole
        task longer and be cut by the kill at the end of the grace period. prefork starts none.
        """
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            raise Reject("worker shutting down: handed back to the queue unrun", requeue=True)

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Store llm-engine's error meta on failure, then run the hooks; never raises.

        Anything raised here would be a Celery "internal error" that overwrites a stored SUCCESS,
        so every step is guarded.
        """
        request = args[0] if args else None
        try:
            if status == states.FAILURE and isinstance(retval, BaseException):
                mark_trace_error(retval)
                response: Any = self._store_failure(task_id, retval)
            else:
                response = retval
            deps.current().hooks.run(request, response, task_id)
        except Exception as exc:
            logger.error("after-return handling failed for task %s: %s: %s", task_id, type(exc).__name__, exc)
            release_exception(exc)

    def _store_failure(self, task_id: str, exc: BaseException) -> dict[str, str]:
        """Overwrite Celery's failure meta with llm-engine's.

        (Celery passes ``einfo=None`` to ``after_return`` on failure, so the trace comes from ``exc``.)
        """
        return store_failure(self.backend, task_id, exc, request=self.request)


def mark_trace_error(exc: BaseException) -> None:
    """Under ``ddtrace-run``, flag the running task's span as an error, with the exception's type and stack.

    ddtrace's Celery integration leaves a failure unflagged when the task lists it in ``Task.throws``
    (Celery's "expected" failures, logged in one line without a traceback), which every ForwarderError
    is: a worker whose every task failed would show no error in APM. Nothing is imported or done when
    ddtrace is not already loaded (plain ``python -m forwarder``) or not tracing.
    """
    trace = sys.modules.get("ddtrace.trace")
    span = trace.tracer.current_root_span() if trace is not None else None
    if span is not None:
        span.set_exc_info(type(exc), exc, exc.__traceback__)


def release_task_exception(retval: Any = None, **_: Any) -> None:
    """``task_postrun`` receiver: once a task is over, free the exception it ended with.

    Postrun comes after everything that reads the exception (the stored failure and its traceback,
    ``after_return`` and the hooks, Celery's retry message, the failure and retry signals that tracing
    reads) and, unlike ``after_return``, also after a RETRY. Without it every failed or retried task left
    its frames (request, model answer) in reference cycles for the cyclic collector (tests/test_task_frames.py).
    """
    if isinstance(retval, BaseException):
        release_exception(retval)
    if isinstance(retval, Retry):
        release_exception(retval.exc)  # the failure that caused it
        # Celery's Retry passes itself into its own args: a reference cycle that kept ``sig``, the retried
        # task's signature with its whole request, until the cyclic collector ran (one per retry, so a
        # model outage piled them up). Nothing reads args or sig once the retry message is sent.
        retval.args = tuple(arg for arg in retval.args if arg is not retval)
        retval.sig = None
