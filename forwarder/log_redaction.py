"""Keep request contents out of Celery's log lines about refused messages.

When Celery refuses a message (unknown task name, a body it cannot use, content it does not accept such as
pickle, an unknown format) it logs the message body (up to 1 KiB) and its headers, which include
``argsrepr``, the producer's rendering of the arguments. An llm-engine request carries the caller's
``callback_auth`` password, so those lines would log it. This filter keeps each line (its reason, the
task name and id) and replaces body and argument renderings with "(hidden)". Tested by
tests/test_bad_input.py::test_no_secret_in_logs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import consumer as celery_consumer

HIDDEN = "(hidden)"
#: Message headers safe to log (never the arguments' renderings).
SAFE_HEADERS = ("id", "task", "root_id", "parent_id", "retries", "eta", "expires", "origin")


class HideRefusedMessageContents(logging.Filter):
    """A filter for Celery's consumer logger; every record passes, some with their arguments redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else None
        if args is None:
            return True
        if record.msg is celery_consumer.UNKNOWN_TASK_ERROR and len(args) == 4:
            exc, _body, headers, delivery_info = args
            record.args = (exc, HIDDEN, _safe_headers(headers), delivery_info)
        elif record.msg is celery_consumer.INVALID_TASK_ERROR and len(args) == 2:
            record.args = (args[0], HIDDEN)
        elif record.msg is celery_consumer.MESSAGE_DECODE_ERROR and len(args) == 5:
            exc, content_type, content_encoding, _headers, _body = args
            record.args = (exc, content_type, content_encoding, HIDDEN, HIDDEN)
        elif record.msg is celery_consumer.UNKNOWN_FORMAT and len(args) == 1:
            record.args = (HIDDEN,)
        return True


def _safe_headers(headers: Any) -> Any:
    if not isinstance(headers, dict):
        return HIDDEN
    return {key: headers[key] for key in SAFE_HEADERS if key in headers}


def install() -> None:
    """Attach the filter to the logger Celery's consumer uses for refused messages (idempotent)."""
    logger = logging.getLogger(celery_consumer.__name__)
    if not any(isinstance(f, HideRefusedMessageContents) for f in logger.filters):
        logger.addFilter(HideRefusedMessageContents())
