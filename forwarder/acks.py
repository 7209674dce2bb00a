"""Acknowledge a finished task's message, retrying a broker blip instead of losing the ack.

kombu logs a failed ack ("Couldn't ack", CRITICAL) and moves on: the message stays unacknowledged and
runs again after the visibility timeout (an hour later by default): a duplicate model call, callback and
Firehose record. Here an ack that fails on a connection error is tried again with a short backoff
(under a second in all: prefork acks from the main process's event loop); if it still fails, one ERROR
line names the consequence, and the failure is counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gateways.errors import release_exception

logger = logging.getLogger(__name__)

#: Attempts in all, and the first pause (doubling): 0.05 + 0.1 + 0.2 + 0.4 s at most between them.
ACK_ATTEMPTS = 5
ACK_BACKOFF = 0.05


class AckCounter:
    """Acks that failed for good in this process (for logs and metrics)."""

    failed = 0


def acknowledge(
    message: Any, task_id: str, errors: tuple[type[BaseException], ...], sleep: Callable[[float], None] = time.sleep
) -> bool:
    """Ack ``message``; returns False when every attempt failed on one of ``errors`` (logged, counted)."""
    for attempt in range(1, ACK_ATTEMPTS + 1):
        failure = ""
        try:
            message.ack()
            return True
        except errors as exc:
            failure = f"{type(exc).__name__}: {exc}"
            release_exception(exc)
        if attempt < ACK_ATTEMPTS:
            logger.warning("ack of task %s failed (%s); retrying (attempt %d of %d)",
                           task_id, failure, attempt + 1, ACK_ATTEMPTS)
            sleep(ACK_BACKOFF * 2 ** (attempt - 1))
    AckCounter.failed += 1
    logger.error(
        "could not ack task %s after %d attempts (%s): the message will run again after the visibility "
        "timeout (failed acks in this process: %d)", task_id, ACK_ATTEMPTS, failure, AckCounter.failed,
    )
    return False
