"""Keep credentials out of the worker's log, at every log level.

- Loggers whose DEBUG lines carry credentials stay at INFO or above: botocore (STS answers with the
  assumed role's secret key and session token, signed headers), urllib3 (callback URLs with their
  query), celery.pool (every task's args, callback_auth passwords included).
- When Celery refuses a message (unknown task name, a body it cannot use, pickle, an unknown format) it
  logs the body (up to 1 KiB) and the headers, whose ``argsrepr`` renders the request with its
  ``callback_auth``. The filter keeps each such line (reason, task name and id) and hides the body and
  argument renderings.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.worker.consumer import consumer as celery_consumer

from forwarder.extensions.base import Extension
from forwarder.settings import Settings

#: Kept at INFO or above even with CELERY_LOG_LEVEL=DEBUG.
CREDENTIAL_LOGGERS = ("botocore", "boto3", "urllib3", "celery.pool")
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


class KeepSecretsOutOfLogs(Extension):
    """Credential loggers at INFO or above; refused messages logged without their contents."""

    def install(self, app: Celery, settings: Settings) -> None:
        for name in CREDENTIAL_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
        logger = logging.getLogger(celery_consumer.__name__)
        if not any(isinstance(f, HideRefusedMessageContents) for f in logger.filters):
            logger.addFilter(HideRefusedMessageContents())
