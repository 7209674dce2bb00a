"""Log one line once the worker consumes: what tests, the demo and operators wait for."""

from __future__ import annotations

import logging
import os

from celery import Celery

from forwarder.extensions.base import Extension
from forwarder.settings import Settings

logger = logging.getLogger("forwarder")

#: The start of the line.
READY_LINE = "forwarder ready"


class ReadyLine(Extension):
    """``forwarder ready: pool=... concurrency=... queue=... pid=...``."""

    def install(self, app: Celery, settings: Settings) -> None:
        self.settings = settings

    def process_ready(self) -> None:
        settings = self.settings
        logger.info(
            "%s: pool=%s concurrency=%d queue=%s pid=%d",
            READY_LINE, settings.pool, settings.concurrency, settings.queue, os.getpid(),
        )
