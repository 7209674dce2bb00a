"""Start the Celery worker for the chosen pool, after the model server is ready."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from forwarder import deps
from forwarder.app import build_app
from forwarder.extensions.secret_logs import mask_known_secrets
from forwarder.extensions.task_log import configure_logging, log_configuration
from forwarder.settings import Settings

logger = logging.getLogger("forwarder")


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
        # JSON logs: no banner on stdout, every line of output is a JSON record (the config line says it all).
        "quiet": settings.log_format == "json",
    }
    if settings.pool == "prefork":
        if settings.max_tasks_per_child is not None:
            options["max_tasks_per_child"] = settings.max_tasks_per_child
        if settings.max_memory_per_child is not None:
            options["max_memory_per_child"] = settings.max_memory_per_child
    return options


def run_worker(settings: Settings, notes: Sequence[str] = ()) -> int:
    """Wait for the model, then run the worker until a shutdown signal; returns its exit code.

    ``notes``: what the command line did before logging was set up (an open-file limit raised), logged first.

    Raises:
        ModelNotReady: the model server was not ready within FORWARDER_READY_TIMEOUT.
    """
    configure_logging(settings)  # text or JSON (FORWARDER_LOG_FORMAT); kept through Celery's own setup
    mask_known_secrets(settings)  # from the first line on (the model's URL may carry a password)
    for note in notes:
        logger.info(note)
    log_configuration(settings)
    for warning in settings.warnings:
        logger.warning(warning)
    current = deps.build_deps(settings)
    if settings.ready_timeout > 0:
        current.model.wait_ready(settings.ready_timeout)
        current.model.close()  # children build their own sessions; keep no parent sockets around
    deps.install(current)
    app = build_app(settings)
    current.extensions.install(app, settings)  # everything around tasks and processes: forwarder.extensions
    worker = app.Worker(**worker_options(settings))
    worker.start()
    return int(worker.exitcode or 0)
