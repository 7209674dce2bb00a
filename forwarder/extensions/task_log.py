"""The worker's log: its format, the effective configuration at start, and one line per finished task.

- ``FORWARDER_LOG_FORMAT=json`` (production): every record, Celery's own included, is one JSON object on
  one line (``JsonFormatter``: ``time``, ``level``, ``logger``, ``process``, ``message``, a traceback as
  ``error.stack`` in the same line, the task line's fields as keys, and ``dd.trace_id``/``dd.span_id`` when
  ddtrace's log injection put them on the record). ``text`` (default): Celery's readable lines.
  Celery replaces the root handler when the worker is built (``worker_hijack_root_logger``); the
  formatter is set again on every handler it creates (``after_setup_logger``, ``after_setup_task_logger``),
  and prefork children inherit them.
- At start, one INFO line with every variable's effective value, secrets masked
  (``settings.effective_config``).
- One line per finished task, every outcome (SUCCESS, FAILURE, RETRY, REJECTED, IGNORED): task id, name,
  queue, state, the model's status code and duration, the total duration, retries so far and the error's
  type. The task body notes its model call on the task's own request (``forwarder.model_call``), which Celery
  keeps per task (per thread, per greenlet): nothing is shared between tasks in flight. In JSON the line
  carries the task's own ``dd.trace_id``/``dd.span_id``, taken as the task starts: ddtrace finishes the
  task's span in its own ``task_postrun`` receiver, connected before this one.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import warnings
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Reject, Retry
from celery.utils.log import get_multiprocessing_logger

from forwarder.extensions.base import Extension
from forwarder.model_call import model_call
from forwarder.settings import Settings, effective_config
from forwarder.tracing import UNDER_DDTRACE_RUN

logger = logging.getLogger("forwarder.tasks")
config_logger = logging.getLogger("forwarder")

#: Celery's own worker format (``worker_log_format``), used for text until Celery sets its handler up.
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
#: The start of the configuration line and of each task line.
CONFIG_LINE = "forwarder config"
TASK_LINE = "task finished"
#: Record attribute holding the structured fields of a line (the JSON formatter's extra keys).
FIELDS_ATTR = "forwarder_fields"
#: ddtrace's log-injection record attributes, copied to JSON when they carry a value.
DD_ATTRS = ("dd.trace_id", "dd.span_id", "dd.service", "dd.env", "dd.version")
#: Those naming the task's span, taken as the task starts (its span is finished by the time the line is logged).
DD_IDS = ("dd.trace_id", "dd.span_id")
#: Per-task attributes on the task's request (``task.request``: one per running task).
STARTED_KEY = "forwarder_started"
TRACE_IDS_KEY = "forwarder_trace_ids"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            ),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for attr in DD_ATTRS:
            value = getattr(record, attr, None)
            if value not in (None, "", "0"):
                line[attr] = value
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            line["error.kind"] = type(record.exc_info[1]).__name__
            line["error.message"] = str(record.exc_info[1])
            line["error.stack"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["error.stack"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """The root handler on stderr in the chosen format, at the chosen level (before Celery's own setup).

    JSON: Python warnings become records now (Celery's root-privileges warning comes before its own
    ``captureWarnings``), and the lines Celery writes itself on a shutdown signal are JSON too.
    """
    logging.basicConfig(level=settings.log_level, stream=sys.stderr, format=TEXT_FORMAT)
    if settings.log_format == "json":
        use_json(logging.getLogger())
        # Not logging.captureWarnings: under ddtrace-run, logging holds a warnings module that ddtrace's
        # bootstrap unloaded, and patching that one leaves the live warnings.showwarning printing.
        warnings.showwarning = _log_warning
        _say_in_json()


def use_json(*loggers: logging.Logger | None) -> None:
    """Set the JSON formatter on every handler of ``loggers``."""
    for each in loggers:
        for handler in each.handlers if each is not None else ():
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())


def log_configuration(settings: Settings) -> None:
    """One INFO line: every variable's effective value, secrets masked."""
    config = effective_config(settings)
    if settings.log_format == "json":
        config_logger.info(CONFIG_LINE, extra={FIELDS_ATTR: {"config": config}})
    else:
        config_logger.info("%s: %s", CONFIG_LINE, " ".join(f"{name}={shlex.quote(value)}" for name, value in config.items()))


def trace_ids() -> dict[str, str]:
    """The ids ddtrace's log injection would put on a record now (``DD_LOGS_INJECTION``); empty without it.

    ddtrace-run patches ``Logger.makeRecord`` to add them: a record made here carries exactly what a line
    logged now would, with nothing of ddtrace imported and its own switch respected.
    """
    probe = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "", (), None)
    return {attr: value for attr in DD_IDS if (value := getattr(probe, attr, "0")) not in ("", "0")}


def task_fields(task: Task, task_id: str, state: str, retval: Any) -> dict[str, Any]:
    """The task line's fields, from the task's request and its outcome."""
    request = task.request
    started = getattr(request, STARTED_KEY, None)
    model_status, model_seconds = model_call(request)
    delivery = getattr(request, "delivery_info", None) or {}
    return {
        "task_id": task_id,
        "task_name": task.name,
        "queue": delivery.get("routing_key") or delivery.get("exchange") or None,
        "state": state,
        "model_status_code": model_status,
        "model_duration_ms": _ms(model_seconds),
        "total_duration_ms": _ms(time.monotonic() - started) if started is not None else None,
        "retries": getattr(request, "retries", 0) or 0,
        "error_type": error_type(retval),
    }


def error_type(retval: Any) -> str | None:
    """The failure's type name: the retried exception's for a RETRY; None when the task did not fail."""
    if isinstance(retval, Retry) and isinstance(retval.exc, BaseException):
        return type(retval.exc).__name__
    if isinstance(retval, Reject) and isinstance(retval.reason, BaseException):
        return type(retval.reason).__name__
    if isinstance(retval, BaseException):
        return type(retval).__name__
    return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _text(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())


class TaskLog(Extension):
    """The log format on every handler Celery sets up, and one line per finished task."""

    def install(self, app: Celery, settings: Settings) -> None:
        self.json = settings.log_format == "json"
        if self.json:
            signals.after_setup_logger.connect(_json_after_setup, weak=False, dispatch_uid="forwarder.log.json")
            signals.after_setup_task_logger.connect(
                _json_after_setup, weak=False, dispatch_uid="forwarder.log.json.task"
            )

    def before_task(self, task: Task, task_id: str) -> None:
        setattr(task.request, STARTED_KEY, time.monotonic())
        if self.json and UNDER_DDTRACE_RUN:  # ddtrace finishes the task's span before task_done: ids taken now
            setattr(task.request, TRACE_IDS_KEY, trace_ids())

    def task_done(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        level = logging.WARNING if state == "FAILURE" else logging.INFO
        if not logger.isEnabledFor(level):  # below the log level: nothing to build
            return
        fields = task_fields(task, task_id, state, retval)
        if self.json:
            fields.update(getattr(task.request, TRACE_IDS_KEY, None) or {})
            logger.log(level, "%s: %s %s", TASK_LINE, task_id, state, extra={FIELDS_ATTR: fields})
        else:
            logger.log(level, "%s: %s", TASK_LINE, _text(fields))


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None
) -> None:
    """A Python warning as a record of ``py.warnings`` (as ``logging.captureWarnings`` does)."""
    logging.getLogger("py.warnings").warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())


def _say_in_json() -> None:
    """Celery's signal handlers print ``worker: Warm shutdown (MainProcess)`` and the like with
    ``celery.apps.worker.safe_say`` (a raw write: no logging in a signal handler): the same write, as JSON.

    Celery has no hook for these lines, so its module function is replaced; ``tests/test_upstream_contracts.py``
    pins its signature and that Celery's handlers look it up by name."""
    from celery.apps import worker as celery_worker

    write = getattr(celery_worker, "_original_os_write", os.write)
    formatter = JsonFormatter()

    def say(msg: str, f: Any = sys.__stderr__) -> None:
        line = formatter.format(logging.LogRecord(celery_worker.__name__, logging.INFO, __file__, 0, msg, (), None))
        try:
            write(f.fileno(), f"{line}\n".encode())
        except (OSError, AttributeError, ValueError):  # best effort, as Celery's: never abort a shutdown
            pass

    if callable(getattr(celery_worker, "safe_say", None)):
        celery_worker.safe_say = say


def _json_after_setup(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery built new handlers: JSON on them (and on its multiprocessing logger's)."""
    use_json(logger, get_multiprocessing_logger())
