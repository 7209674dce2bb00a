"""The forward task, wire-compatible with llm-engine's celery forwarder.

Producers send ``[request_dict, arrival_timestamp, *ignored]`` (llm-engine always adds
``return_pickled``) plus optional tracing kwargs, under either of two names; both run the same body
and both retry connection failures with bounded exponential backoff (llm-engine's legacy name never
retried). After the result is stored, ``ForwardTask.after_return`` rewrites a failure into llm-engine's
error meta and runs the post-inference hooks (the whole sequence: ``forwarder.extensions``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import Task, current_task, states
from celery.exceptions import Ignore, InvalidTaskError, Reject, Retry, Terminated, WorkerLostError
from celery.worker import state as worker_state
from celery.worker.request import Request

from forwarder import acks, deps, tracing
from forwarder.errors import ForwarderError, MalformedRequest
from forwarder.extensions.delivery_cap import RECEIVE_COUNT_KEY
from forwarder.model_attempts import call_model
from forwarder.model_call import note_model_call
from forwarder.payload import error_payload, format_trace, plan_request, shape_result
from forwarder.request_ttl import RequestExpired, expired_by, parse_arrival
from gateways.errors import GatewayError, release_exception

logger = logging.getLogger(__name__)

#: Failures Celery's own ``on_failure`` handles specially (revoked, shut down, rejected, retried, lost child).
_CELERY_HANDLED = (Terminated, SystemExit, KeyboardInterrupt, MemoryError, Reject, Ignore, Retry, WorkerLostError)

#: llm-engine's LIRA task name (runnable-image bundles).
TASK_NAME = "ml_serve.celery_service.exec_func"
#: llm-engine's pre-LIRA task name, still sent for legacy bundles.
LEGACY_TASK_NAME = "hosted_model_inference.inference.async_inference.tasks.predict"
TASK_NAMES = (TASK_NAME, LEGACY_TASK_NAME)
#: Default of the request argument, so a task sent without arguments fails as a MalformedRequest.
_NO_REQUEST: Any = object()


def exec_func(payload: Any = _NO_REQUEST, arrival_timestamp: Any = None, *ignored_args: Any, **kwargs: Any) -> Any:
    """Forward one request to the model and return the result to store.

    ``arrival_timestamp`` bounds a wait for the model through an outage (``FORWARDER_REQUEST_TTL``); further
    positional args (``return_pickled``) are accepted and unused;
    tracing kwargs are ignored (ddtrace continues a producer's trace from Celery's headers itself, see
    ``extensions.trace_errors``); its steps are spans (``forwarder.tracing``).
    """
    if payload is _NO_REQUEST:
        raise MalformedRequest("the task has no arguments: expected [request, arrival_timestamp, return_pickled]")
    current = deps.current()
    task_id = current_task.request.id if current_task else None
    with tracing.step(tracing.PLAN, task_id):
        plan = plan_request(payload, current.settings.result_format)
    status_code = None
    seconds = None
    started = time.monotonic()
    try:
        with tracing.step(tracing.MODEL, task_id) as span:
            expiry = _expiry_check(arrival_timestamp, current.settings.request_ttl)
            call = call_model(current.model, plan.body, current.outage, current.retry_policy, task_id or "", expiry)
            answer, status_code, seconds = call.answer, call.answer.status_code, call.seconds
            tracing.tag(span, **{"http.status_code": answer.status_code, "forwarder.model.answer_bytes": answer.size,
                                 "forwarder.model.waited_seconds": round(call.waited, 3)})
    finally:  # for the task log line and the metrics (forwarder.model_call), whatever the outcome
        note_model_call(status_code, seconds if seconds is not None else time.monotonic() - started)
    return shape_result(answer.body, answer.status_code, plan, max_bytes=current.settings.max_result_bytes)


def _expiry_check(arrival_timestamp: Any, ttl: float | None) -> Callable[[], None] | None:
    """While the task waits out a model outage: raise RequestExpired once its request is older than the TTL
    (the same check ``extensions.expiry`` makes as the task starts)."""
    if ttl is None or parse_arrival(arrival_timestamp) is None:
        return None

    def check() -> None:
        reason = expired_by(arrival_timestamp, datetime.now(UTC), ttl)
        if reason is not None:
            raise RequestExpired(reason)

    return check


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
            if not isinstance(self.args, (list, tuple)) or not isinstance(self.kwargs, dict):
                raise InvalidTaskError("malformed task message: body is not [args (array), kwargs (object), embed]")
        except InvalidTaskError as exc:
            refused = exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            refused = InvalidTaskError(f"malformed task message: {type(exc).__name__}: {exc}")
        else:
            self._carry_receive_count(message)
            return
        headers = kwargs.get("headers") or getattr(message, "headers", None)
        _store_refusal(kwargs.get("task"), headers, refused)
        raise refused from None

    def _carry_receive_count(self, message: Any) -> None:
        """SQS: hand the message's ApproximateReceiveCount to the task (``extensions.delivery_cap``)."""
        sqs_message = (getattr(message, "delivery_info", None) or {}).get("sqs_message") or {}
        received = (sqs_message.get("Attributes") or {}).get("ApproximateReceiveCount")
        if received is not None:
            # request_dict is the live dict the task's context is built from (tests/test_upstream_contracts.py)
            self.request_dict[RECEIVE_COUNT_KEY] = int(received)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        """Celery's handling, except that a task whose outcome is not stored is handed back, not acked.

        A result store that stays down through its retries (``forwarder.app``: ``result_backend_always_retry``)
        makes the trace an "internal error", which Celery acks: the model did the work, the producer polls
        PENDING until the task expires, and nothing retries. Here the stored state is read first; if it is
        not SUCCESS or FAILURE, the message goes back to the queue to run again (at least once).
        """
        exc = getattr(exc_info, "exception", None)
        if isinstance(exc, ExceptionWithTraceback):  # prefork: the child's exception, as Celery unwraps it
            exc = exc.exc
        if not isinstance(exc, _CELERY_HANDLED) and self.task.acks_late and not outcome_stored(self.task.backend, self.id):
            worker_state.task_ready(self)
            StoreFailures.handed_back += 1
            logger.error(
                "task %s: its outcome could not be stored (%s: %s); the message is handed back to run again "
                "(hand-backs in this process: %d)", self.id, type(exc).__name__, exc, StoreFailures.handed_back,
            )
            self.reject(requeue=True)
            return
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def acknowledge(self) -> None:
        """Ack the message, retrying a broker blip (``forwarder.acks``) instead of kombu's log-and-forget,
        and never on a channel a reconnect closed (that ended the worker: issue 22)."""
        if not self.acknowledged:  # type: ignore[has-type]
            acks.acknowledge(self.message, self.task_id, self.connection_errors)
            self.acknowledged = True

    def reject(self, requeue: bool = False) -> None:
        """Reject (``requeue``: back to the queue) as ``acknowledge`` acks: Celery's own on a lost worker, a
        ``Reject`` (``extensions.shutdown_handback``) and an unstored outcome (``on_failure``) all come here."""
        if not self.acknowledged:
            acks.reject(self.message, self.task_id, requeue, self.connection_errors)
            self.acknowledged = True
            self.send_event("task-rejected", requeue=requeue)


class StoreFailures:
    """Tasks handed back in this process because their outcome could not be stored (for logs and metrics)."""

    handed_back = 0


def outcome_stored(backend: Any, task_id: str) -> bool:
    """Whether a final state (SUCCESS or FAILURE) is stored for ``task_id``; False when the store is unreachable."""
    try:
        # One read, not get_task_meta's retry loop: under prefork this runs in the main process, whose event
        # loop must not sleep through a store outage. Private to Celery: tests/test_upstream_contracts.py.
        return backend._get_task_meta_for(task_id).get("status") in states.READY_STATES
    except Exception as exc:  # the store is down: nothing can be known to be stored
        release_exception(exc)
        return False


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
    """Store a FAILURE the way llm-engine does: ``exc_type``, ``exc_message``, ``custom`` JSON and no
    traceback, so llm-engine's API hands callers the error text, never the worker's frames. The trace
    goes to the worker's log (and to the APM span, see ``extensions.trace_errors``).

    Returns llm-engine's error payload, which the hooks report as the response.
    """
    trace = format_trace(exc)
    payload = error_payload(exc, trace)
    prepared = backend.prepare_exception(exc)
    meta = {"exc_type": prepared["exc_type"], "exc_message": prepared["exc_message"], "custom": json.dumps(payload)}
    backend.store_result(task_id, meta, states.FAILURE, traceback=None, request=request)
    if isinstance(exc, (ForwarderError, GatewayError)):  # expected (model down, bad request): one line
        logger.warning("task %s failed: %s: %s", task_id, type(exc).__name__, exc)
    else:  # a bug: the trace, for whoever reads the log
        logger.error("task %s failed: %s: %s\n%s", task_id, type(exc).__name__, exc, trace.rstrip())
    return payload


class ForwardTask(Task):
    """Base of both task names: llm-engine's failure meta, then hooks, after the result is stored."""

    Request = CheckedRequest

    # Expected failures (model down, malformed request) are reported in the stored result and one
    # log line; Celery logs exceptions listed here without a traceback (and ddtrace would not flag their
    # spans as errors, hence the FlagFailuresInTrace extension).
    throws = (ForwarderError, GatewayError)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """The extensions' ``before_task``, in order (one may hand the message back with ``Reject``)."""
        deps.current().extensions.before_task(self, task_id)

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Store llm-engine's error meta on failure, run the hooks, then the extensions' ``after_task``.

        Never raises: anything raised here would be a Celery "internal error" that overwrites a stored
        SUCCESS, so every step is guarded.
        """
        current = deps.current()
        request = args[0] if args else None
        try:
            response = self._store_failure(task_id, retval) if _failed(status, retval) else retval
            current.hooks.run(request, response, task_id, status)
        except Exception as exc:
            logger.error("after-return handling failed for task %s: %s: %s", task_id, type(exc).__name__, exc)
            release_exception(exc)
        current.extensions.after_task(self, task_id, status, retval)

    def _store_failure(self, task_id: str, exc: BaseException) -> dict[str, str]:
        """Overwrite Celery's failure meta with llm-engine's.

        (Celery passes ``einfo=None`` to ``after_return`` on failure, so the trace comes from ``exc``.)
        """
        return store_failure(self.backend, task_id, exc, request=self.request)


def _failed(status: str, retval: Any) -> bool:
    return status == states.FAILURE and isinstance(retval, BaseException)
