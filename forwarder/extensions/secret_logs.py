"""Keep credentials out of the worker's log, at every log level; when in doubt, hide more.

- Loggers whose DEBUG lines carry credentials stay at INFO or above: botocore (STS answers with the
  assumed role's secret key and session token, signed headers), urllib3 (callback URLs with their
  query), celery.pool (every task's args, callback_auth passwords included).
- When Celery refuses a message (unknown task name, a body it cannot use, pickle, an unknown format) it
  logs the body (up to 1 KiB) and the headers, whose ``argsrepr`` renders the request with its
  ``callback_auth``. The filter keeps each such line (reason, task name and id) and hides the body and
  argument renderings. It recognises those lines by Celery's log-format constants (private to Celery's
  consumer module), and checks each constant still has the shape it redacts. A line of that logger it does
  not recognise (Celery changed its formats) fails closed: every argument that could be a body, headers or
  a rendering of them is hidden.
- Every record on every handler Celery sets up (``MaskKnownSecrets``): the secret values this worker knows
  (broker and result-backend URL passwords, the default callback password and its basic-auth token, the
  webhook signing secrets, the AWS keys and any ``*PASSWORD*``/``*SECRET*``/``*TOKEN*`` variable of the
  environment) are replaced by ``***`` in the message, the traceback and the JSON fields, whatever the
  format of the line. This one does not depend on anything of Celery's but its logging signals.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from celery import Celery, signals
from celery.utils.log import get_multiprocessing_logger
from celery.worker.consumer import consumer as celery_consumer

from forwarder.errors import is_secret_variable
from forwarder.extensions.base import Extension
from forwarder.settings import VARS, Settings
from forwarder.urls import MASK

#: Kept at INFO or above even with CELERY_LOG_LEVEL=DEBUG.
CREDENTIAL_LOGGERS = ("botocore", "boto3", "urllib3", "celery.pool")
HIDDEN = "(hidden)"
#: Message headers safe to log (never the arguments' renderings).
SAFE_HEADERS = ("id", "task", "root_id", "parent_id", "retries", "eta", "expires", "origin")
#: Shorter values are not masked: they would mangle every line, and cannot be told from ordinary text.
MIN_SECRET_LENGTH = 4
#: Environment variables holding AWS credentials (boto3 reads them itself: they are not in the settings).
AWS_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
#: In an argument of an unrecognised consumer line, these mean a message body or its renderings.
BODY_MARKERS = ("callback_auth", "argsrepr", "kwargsrepr", "password", "'args'", '"args"', "'kwargs'", '"kwargs"')


# ----------------------------------------------------------------------- refused messages (consumer)


def _hide_unknown_task(args: tuple[Any, ...]) -> tuple[Any, ...]:
    exc, _body, headers, delivery_info = args
    return (exc, HIDDEN, _safe_headers(headers), delivery_info)


def _hide_invalid_task(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0], HIDDEN)


def _hide_decode_error(args: tuple[Any, ...]) -> tuple[Any, ...]:
    exc, content_type, content_encoding, _headers, _body = args
    return (exc, content_type, content_encoding, HIDDEN, HIDDEN)


def _hide_unknown_format(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (HIDDEN,)


#: Celery's constant (in ``celery.worker.consumer.consumer``) -> its placeholder count, and the redaction.
KNOWN_FORMATS: dict[str, tuple[int, Callable[[tuple[Any, ...]], tuple[Any, ...]]]] = {
    "UNKNOWN_TASK_ERROR": (4, _hide_unknown_task),
    "INVALID_TASK_ERROR": (2, _hide_invalid_task),
    "MESSAGE_DECODE_ERROR": (5, _hide_decode_error),
    "UNKNOWN_FORMAT": (1, _hide_unknown_format),
}


def _placeholders(fmt: str) -> int:
    return fmt.replace("%%", "").count("%")


def recognised(msg: Any, nargs: int) -> Callable[[tuple[Any, ...]], tuple[Any, ...]] | None:
    """The redaction for a line logged with Celery's format ``msg`` and ``nargs`` arguments; None when
    ``msg`` is none of the known formats or no longer has the shape the redaction expects."""
    for name, (count, hide) in KNOWN_FORMATS.items():
        fmt = getattr(celery_consumer, name, None)
        if msg is fmt and isinstance(fmt, str) and _placeholders(fmt) == count == nargs:
            return hide
    return None


def _hide_if_body_like(arg: Any) -> Any:
    """Fail closed: anything that could be a body, headers or their rendering is hidden."""
    if arg is None or isinstance(arg, (BaseException, bool, int, float)):
        return arg
    if isinstance(arg, str):
        text = arg.lower()
        looks_like_body = text.lstrip().startswith(("[", "{", "(")) or any(m in text for m in BODY_MARKERS)
        return HIDDEN if looks_like_body else arg
    return HIDDEN  # dicts (headers, delivery info), bytes (bodies), lists, and objects of unknown rendering


class HideRefusedMessageContents(logging.Filter):
    """A filter for Celery's consumer logger; every record passes, some with their arguments redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else None
        if isinstance(record.args, Mapping):  # ``%(name)s`` formats: not one of Celery's known ones
            record.args = {key: _hide_if_body_like(value) for key, value in record.args.items()}
            return True
        if not args:
            return True
        hide = recognised(record.msg, len(args))
        record.args = hide(args) if hide is not None else tuple(_hide_if_body_like(arg) for arg in args)
        return True


def _safe_headers(headers: Any) -> Any:
    if not isinstance(headers, dict):
        return HIDDEN
    return {key: headers[key] for key in SAFE_HEADERS if key in headers}


# ----------------------------------------------------------------------------- known secret values


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _forms(secret: str) -> list[str]:
    """A secret as it may appear: as is, URL-decoded, URL-encoded."""
    return [secret, unquote(secret), quote(secret, safe=""), quote(secret)]


def secret_values(settings: Settings, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every secret value this worker knows, in every form it may be written, longest first."""
    environ = os.environ if environ is None else environ
    found: list[str] = []
    for var in VARS:  # every URL's password (broker, result backend, model, callback...), every secret variable
        value = getattr(settings, var.attr, None)
        if not isinstance(value, str) or not value:
            continue
        if is_secret_variable(var.name):
            found.append(value)
        password = _url_password(value) if "://" in value else None
        if password:
            found += _forms(password)
    if settings.callback_password:
        user_pass = f"{settings.callback_username}:{settings.callback_password}".encode()
        found.append(base64.b64encode(user_pass).decode("ascii"))
    for secret in settings.callback_signing_secret.split():
        found += [secret, secret.removeprefix("whsec_")]
    for name, value in environ.items():
        if name in AWS_SECRET_VARIABLES or is_secret_variable(name):
            found.append(value)
            password = _url_password(value) if "://" in value else None
            if password:
                found += _forms(password)
    unique = {value for value in found if len(value) >= MIN_SECRET_LENGTH}
    return tuple(sorted(unique, key=len, reverse=True))


class MaskKnownSecrets(logging.Filter):
    """A handler filter: the known secret values, wherever they appear in a record, become ``***``.

    On handlers, not loggers: a logger's filters see only the records logged on that very logger, a
    handler's see every record it writes, propagated ones included.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format: logging reports it itself; the raw parts are masked below
            message = None
        if message is not None:
            masked = self.mask(message)
            if masked != message:
                record.msg, record.args = masked, None
        elif isinstance(record.msg, str):
            record.msg = self.mask(record.msg)
            record.args = None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            masked = self.mask(record.exc_text)
            if masked != record.exc_text:
                # Formatters print exc_text when exc_info is gone; the exception itself would show the secret.
                record.exc_text, record.exc_info = masked, None
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        for key, value in list(record.__dict__.items()):  # extra fields (the JSON line's keys)
            if key not in _RECORD_ATTRS:
                record.__dict__[key] = self._mask_value(value)
        return True

    def _mask_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {key: self._mask_value(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._mask_value(item) for item in value)
        return value


#: A plain record's own attributes (the rest are ``extra`` fields).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def mask_on_handlers(mask: MaskKnownSecrets, *loggers: logging.Logger | None) -> None:
    """Add ``mask`` to every handler of ``loggers`` that has no such filter yet."""
    for each in loggers:
        for handler in each.handlers if each is not None else ():
            if not any(isinstance(f, MaskKnownSecrets) for f in handler.filters):
                handler.addFilter(mask)


def mask_known_secrets(settings: Settings) -> None:
    """From now on, the known secret values are masked on every handler: the root's now, and each handler
    Celery sets up later (its logging signals). Idempotent."""
    mask = MaskKnownSecrets(secret_values(settings))
    if not mask.secrets:
        return

    def after_setup(logger: logging.Logger | None = None, **_: Any) -> None:
        # Celery replaced or added handlers (the root's, the task logger's): the mask goes on each.
        mask_on_handlers(mask, logging.getLogger(), logger, get_multiprocessing_logger())

    mask_on_handlers(mask, logging.getLogger())
    signals.after_setup_logger.connect(after_setup, weak=False, dispatch_uid="forwarder.log.mask")
    signals.after_setup_task_logger.connect(after_setup, weak=False, dispatch_uid="forwarder.log.mask.task")


class KeepSecretsOutOfLogs(Extension):
    """Credential loggers at INFO or above; refused messages logged without their contents; the known
    secret values masked on every handler."""

    def install(self, app: Celery, settings: Settings) -> None:
        for name in CREDENTIAL_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
        logger = logging.getLogger(celery_consumer.__name__)
        if not any(isinstance(f, HideRefusedMessageContents) for f in logger.filters):
            logger.addFilter(HideRefusedMessageContents())
        mask_known_secrets(settings)  # again: harmless when the worker did it first
