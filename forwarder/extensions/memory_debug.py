"""``FORWARDER_MEMORY_DEBUG``: start the memory diagnostics (``forwarder.memory``) in each process.

Without the flag nothing is imported or started, and SIGUSR2 (the dump signal) is ignored: its default
action would kill a worker, and its in-flight tasks, that an operator asked for a dump.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery import Celery, Task

from forwarder.extensions.base import Extension
from forwarder.settings import Settings


class MemoryDebug(Extension):
    """Allocation tracing and periodic dumps per process when asked; tracks in-flight tasks for the dumps."""

    def install(self, app: Celery, settings: Settings) -> None:
        self.settings = settings

    def process_start(self) -> None:
        if self.settings.memory_debug:
            from forwarder.memory import start_memory_debug

            start_memory_debug(self.settings)
        elif "CELERY_RDBSIG" not in os.environ:  # (then Celery's remote debugger owns SIGUSR2)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def before_task(self, task: Task, task_id: str) -> None:
        if self.settings.memory_debug:
            from forwarder.memory import task_started

            task_started(task_id)

    def task_done(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        if self.settings.memory_debug:
            from forwarder.memory import task_finished

            task_finished(task_id)
