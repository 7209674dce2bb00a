"""The result backends the worker uses: Celery's Redis backend and ``gateways.s3_backend``, with one policy.

A store that fails is retried (``result_backend_always_retry``, see ``forwarder.app``). When it still fails
(``BackendStoreError``), Celery records that error itself as the task's FAILURE as soon as the store answers again: the model's
answer is lost and the producer reads "failed to store result" for a task that succeeded. Here a FAILURE
whose cause is the store is not stored; ``tasks.CheckedRequest`` then finds no outcome and hands the
message back, so the task runs again (at least once) and stores its real outcome.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError

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


class RedisResults(KeepStoreFailuresOut, RedisBackend):
    """Celery's Redis backend with the policy above."""


class S3Results(KeepStoreFailuresOut, S3ResultBackend):
    """``gateways.s3_backend.S3ResultBackend`` (one S3 client per process) with the policy above."""


def backend_class(result_backend: str) -> str:
    """The ``app.backend_cls`` value for a result-backend URL: ``<class path>+<url>``, which Celery splits."""
    name = "S3Results" if result_backend.startswith("s3://") else "RedisResults"
    return f"{__name__}:{name}+{result_backend}"
