"""Start the Celery worker for the chosen pool, after the model server is ready."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from celery import signals

from forwarder import deps, log_redaction, redelivery
from forwarder.app import build_app
from forwarder.settings import Settings
from gateways.cached_client import close_all

logger = logging.getLogger("forwarder")

#: The line tests and operators wait for: logged once the worker consumes.
READY_LINE = "forwarder ready"
#: Kept at INFO or above even with CELERY_LOG_LEVEL=DEBUG: their DEBUG lines carry credentials (botocore:
#: STS answers with the assumed role's secret key and session token, signed headers; urllib3: callback
#: URLs with their query; celery.pool: every task's args, callback_auth passwords included).
CREDENTIAL_LOGGERS = ("botocore", "boto3", "urllib3", "celery.pool")


def worker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``app.Worker`` for the chosen pool."""
    options: dict[str, Any] = {
        "pool": settings.pool,
        "concurrency": settings.concurrency,
        "queues": [settings.queue],
        "loglevel": settings.log_level,
        "optimization": "fair",
        # A forwarder needs no cluster chatter: mingle costs ~1 s at start, gossip a steady stream.
        "without_mingle": True,
        "without_gossip": True,
    }
    if settings.pool == "prefork":
        if settings.max_tasks_per_child is not None:
            options["max_tasks_per_child"] = settings.max_tasks_per_child
        if settings.max_memory_per_child is not None:
            options["max_memory_per_child"] = settings.max_memory_per_child
    return options


def run_worker(settings: Settings) -> int:
    """Wait for the model, then run the worker until a shutdown signal; returns its exit code.

    Raises:
        ModelNotReady: the model server was not ready within FORWARDER_READY_TIMEOUT.
    """
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr, format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
    )
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    for warning in settings.warnings:
        logger.warning(warning)
    current = deps.build_deps(settings)
    if settings.ready_timeout > 0:
        current.model.wait_ready(settings.ready_timeout)
        current.model.close()  # children build their own sessions; keep no parent sockets around
    deps.install(current)
    connect_signals(settings)
    log_redaction.install()  # Celery would log a refused message's arguments (callback passwords)
    app = build_app(settings)
    if not settings.broker_is_sqs:
        redelivery.install(app)  # kombu alone never restores a dead worker's messages under gevent
    worker = app.Worker(**worker_options(settings))
    worker.start()
    return int(worker.exitcode or 0)


def connect_signals(settings: Settings) -> None:
    """Process-lifecycle wiring: ready line, per-process diagnostics, closing clients at exit."""

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        logger.info(
            "%s: pool=%s concurrency=%d queue=%s pid=%d",
            READY_LINE, settings.pool, settings.concurrency, settings.queue, os.getpid(),
        )

    @signals.worker_process_init.connect(weak=False)
    def _child_started(**_: Any) -> None:
        _start_memory_debug(settings)

    @signals.worker_init.connect(weak=False)
    def _main_started(**_: Any) -> None:
        _start_memory_debug(settings)

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_stopping(**_: Any) -> None:
        close_all()

    @signals.worker_shutdown.connect(weak=False)
    def _main_stopping(**_: Any) -> None:
        close_all()


def _start_memory_debug(settings: Settings) -> None:
    # Nothing is imported or started unless asked: zero overhead by default.
    if settings.memory_debug:
        from forwarder.memory import start_memory_debug

        start_memory_debug(settings)
    elif "CELERY_RDBSIG" not in os.environ:  # (then Celery's remote debugger owns SIGUSR2)
        # The dump signal's default action kills the process: an operator asking a worker without the
        # flag for a dump must not lose it (and its in-flight tasks) by it.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
