"""One request's calls to the model: held through an outage, retried in place on an overload status opted in.

- A connection failure (refused, reset before any answer, connect timeout) or a proxy's 502/503/504 with no
  body: the task probes the readiness URL once. Not ready: an outage (``forwarder.model_outage``); the task
  waits in place and calls again once the model is back, without a Celery retry or the retry budget. Still
  ready: not an outage the hold could wait out (readiness would end it at once), so the call is tried again
  at once, ``QUICK_RETRIES`` times, and then left to Celery's retry with backoff (``FORWARDER_RETRY_MAX``).
- An answer whose status is in ``FORWARDER_RETRY_STATUSES`` (say 429 or 503 from an overloaded model): sent
  again after its ``Retry-After`` (capped) or the backoff, up to ``FORWARDER_RETRY_MAX`` times; the last
  answer is the result, as any other status is (llm-engine stores every status as the result).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from forwarder.model_outage import ModelOutage
from gateways.errors import release_exception
from gateways.model_server import ModelAnswer, ModelClient, ModelConnectionError

logger = logging.getLogger(__name__)

#: Immediate new tries of a call that failed to connect while the model still answered ready.
QUICK_RETRIES = 2
#: urllib3's Retry-After parser (seconds or an HTTP date; its public ``parse_retry_after``).
_RETRY_AFTER = Retry(0)


@dataclass(frozen=True)
class RetryPolicy:
    """Statuses retried in place, and how often and how long apart (``FORWARDER_RETRY_*``)."""

    statuses: frozenset[int]
    retries: int
    backoff: float
    backoff_max: float

    def delay(self, retry_after: str | None, attempt: int) -> float:
        """Seconds before the next try: the answer's ``Retry-After`` if valid, else full-jitter backoff;
        never more than ``backoff_max``."""
        if retry_after:
            try:
                return min(self.backoff_max, max(0.0, _RETRY_AFTER.parse_retry_after(retry_after)))
            except InvalidHeader:
                pass
        return random.uniform(0, min(self.backoff_max, self.backoff * 2**attempt))  # noqa: S311 (jitter)


@dataclass(frozen=True)
class ModelCall:
    """The answer, how long its own call took, and the seconds the task waited for the model before it."""

    answer: ModelAnswer
    seconds: float
    waited: float


def call_model(
    model: ModelClient,
    body: Any,
    outage: ModelOutage,
    policy: RetryPolicy,
    task_id: str,
    check: Callable[[], None] | None = None,
) -> ModelCall:
    """POST ``body`` until an answer comes back, holding through an outage (see the module docstring).

    ``check``: called while waiting for the model; may raise to end the wait.

    Raises:
        ModelConnectionError: connection failures while the model answered ready (Celery retries the task).
        celery.exceptions.Reject: handed back to the queue (outage longer than its limit, or a warm shutdown).
        ModelServerError: any other failure of the call (read timeout, answer not JSON or too large).
    """
    waited = 0.0
    quick = 0
    overloaded = 0
    while True:
        waited = outage.wait(task_id, waited, check)
        started = time.monotonic()
        try:
            answer = model.predict(body)
        except ModelConnectionError as exc:
            quick += 0 if outage.away or outage_confirmed(model, outage, str(exc)) else 1
            if quick > QUICK_RETRIES:
                raise
            # Tried again (the next turn waits for the model if it is away): free this failure's frames now,
            # whose locals hold the request, instead of leaving a cycle for the collector.
            release_exception(exc)
            continue
        seconds = time.monotonic() - started
        if answer.status_code in policy.statuses and overloaded < policy.retries:
            delay = policy.delay(answer.retry_after, overloaded)
            overloaded += 1
            logger.debug("task %s: model answered HTTP %d, sent again in %.1f s (%d/%d)",
                         task_id, answer.status_code, delay, overloaded, policy.retries)
            time.sleep(delay)
            continue
        return ModelCall(answer, seconds, waited)


def outage_confirmed(model: ModelClient, outage: ModelOutage, failure: str) -> bool:
    """Probe readiness once after a failed call; not ready: mark the model away (returns True)."""
    ready, seen = model.is_ready()
    if ready:
        return False
    outage.mark_away(f"{failure}; readiness: {seen}")
    return True
