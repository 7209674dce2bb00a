"""The result backends the worker uses: Celery's Redis backend and ``gateways.s3_backend``, with one policy.

A store that fails is retried (``result_backend_always_retry``, see ``forwarder.app``). When it still fails
(``BackendStoreError``), Celery records that error itself as the task's FAILURE as soon as the store answers again: the model's
answer is lost and the producer reads "failed to store result" for a task that succeeded. Here a FAILURE
whose cause is the store is not stored; ``tasks.CheckedRequest`` then finds no outcome and hands the
message back, so the task runs again (at least once) and stores its real outcome.

Celery reads a task's stored state before every write, so that a late duplicate never overwrites a SUCCESS
(``BaseKeyValueStoreBackend._store_result``): two round trips per write. The STARTED write of a first
delivery skips that read (``FirstStartWritesOnly``): no other delivery of the message exists yet, so nothing
can have been stored (on Redis: kombu's ``redelivered`` mark is absent; on SQS: ApproximateReceiveCount is
1). Every other write, and every write of a redelivery, keeps it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from gateways.s3_backend import S3ResultBackend

logger = logging.getLogger(__name__)


class KeepStoreFailuresOut:
    """Mixin for a Celery backend: never store "the store failed" as a task's outcome."""

    def mark_as_failure(self, task_id: str, exc: Any, *args: Any, **kwargs: Any) -> Any:
        # Only Celery's "gave up retrying the store" error: the backends' own retry predicates are too broad
        # to judge a task's exception by (kombu's Redis errors include KeyError, hence NotRegistered).
        if isinstance(exc, BackendStoreError):
            logger.warning("task %s: not storing the result store's own failure (%s) as its outcome",
                           task_id, type(exc).__name__)
            return None
        return super().mark_as_failure(task_id, exc, *args, **kwargs)  # type: ignore[misc]


class FirstStartWritesOnly:
    """Mixin for a key-value Celery backend: a first delivery's STARTED is written without reading first."""

    app: Any

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        if state != states.STARTED or not first_delivery(request, self.app.conf.broker_url or ""):
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback=traceback, request=request, **kwargs)
        backend: Any = self
        meta = backend._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        try:
            backend._set_with_state(backend.get_key_for_task(task_id), backend.encode(meta), state)
        except BackendStoreError as ex:
            raise BackendStoreError(str(ex), state=state, task_id=task_id) from ex
        return result


def first_delivery(request: Any, broker_url: str) -> bool:
    """Whether ``request`` (a task's context) is its message's first delivery, as far as the broker says.

    SQS: ApproximateReceiveCount (carried by ``tasks.CheckedRequest``) is 1. Redis: kombu's ``redelivered``
    mark is absent. Anything else, or unknown: False (the read stays).
    """
    received = getattr(request, "forwarder_receive_count", None)
    if received is not None:
        return int(received) == 1
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return False
    delivery = getattr(request, "delivery_info", None)
    return isinstance(delivery, dict) and "redelivered" in delivery and not delivery["redelivered"]


class RedisResults(KeepStoreFailuresOut, FirstStartWritesOnly, RedisBackend):
    """Celery's Redis backend with the policy above."""


class S3Results(KeepStoreFailuresOut, FirstStartWritesOnly, S3ResultBackend):
    """``gateways.s3_backend.S3ResultBackend`` (one S3 client per process) with the policy above."""


def backend_class(result_backend: str) -> str:
    """The ``app.backend_cls`` value for a result-backend URL: ``<class path>+<url>``, which Celery splits."""
    name = "S3Results" if result_backend.startswith("s3://") else "RedisResults"
    return f"{__name__}:{name}+{result_backend}"
