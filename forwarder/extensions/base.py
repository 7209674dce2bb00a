"""The extension interface, and the ordered runner that wires every extension into Celery once.

An extension is one concern around every task or process (logs, metrics, probes, guarantees). Each
method is a no-op unless overridden, as in dramatiq's middleware. Celery signals, task methods and
bootsteps stay the mechanism underneath; ``Extensions.install`` is the only place that connects them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, signals

if TYPE_CHECKING:
    from forwarder.settings import Settings

logger = logging.getLogger(__name__)


class Extension:
    """One concern around every task or process; every method is a no-op unless overridden."""

    def install(self, app: Celery, settings: Settings) -> None:
        """Wire into ``app`` before its worker is built (bootsteps, log filters, worker signals); no I/O."""

    def process_start(self) -> None:
        """In each worker process as it starts: the main process, then each prefork child."""

    def process_ready(self) -> None:
        """In the main process, once the worker consumes (Celery's ``worker_ready``)."""

    def process_stop(self) -> None:
        """In each worker process as it stops."""

    def before_task(self, task: Task, task_id: str) -> None:
        """Before the task's body runs. May raise ``celery.exceptions.Reject`` to hand the message back."""

    def after_task(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        """After a SUCCESS or FAILURE is stored and the post-inference hooks ran (not after a RETRY)."""

    def task_done(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        """After every outcome, RETRY and REJECTED included (Celery's ``task_postrun``): the last word."""


class Extensions:
    """The installed extensions, run in list order on the way in and in reverse order on the way out.

    A failing extension is logged and skipped, never fatal (the task's outcome is already decided), except
    in ``before_task``, where raising is how an extension refuses to run a task.
    """

    def __init__(self, extensions: Sequence[Extension]) -> None:
        self.extensions = tuple(extensions)

    def __iter__(self):  # noqa: ANN204
        return iter(self.extensions)

    def install(self, app: Celery, settings: Settings) -> None:
        """Install every extension on ``app``, then connect the process and task events (once per process)."""
        for extension in self.extensions:
            extension.install(app, settings)
        # weak=False: the receivers are bound methods of an object nothing else may hold.
        signals.worker_init.connect(self._process_start, weak=False, dispatch_uid="forwarder.start.main")
        signals.worker_process_init.connect(self._process_start, weak=False, dispatch_uid="forwarder.start.child")
        signals.worker_ready.connect(self._process_ready, weak=False, dispatch_uid="forwarder.ready")
        signals.worker_shutdown.connect(self._process_stop, weak=False, dispatch_uid="forwarder.stop.main")
        signals.worker_process_shutdown.connect(self._process_stop, weak=False, dispatch_uid="forwarder.stop.child")
        signals.task_postrun.connect(self._task_postrun, weak=False, dispatch_uid="forwarder.task_done")

    def before_task(self, task: Task, task_id: str) -> None:
        for extension in self.extensions:
            extension.before_task(task, task_id)

    def after_task(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        for extension in reversed(self.extensions):
            _guarded(extension.after_task, task, task_id, state, retval)

    def task_done(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        for extension in reversed(self.extensions):
            _guarded(extension.task_done, task, task_id, state, retval)

    def _process_start(self, **_: Any) -> None:
        for extension in self.extensions:
            _guarded(extension.process_start)

    def _process_ready(self, **_: Any) -> None:
        for extension in self.extensions:
            _guarded(extension.process_ready)

    def _process_stop(self, **_: Any) -> None:
        for extension in reversed(self.extensions):
            _guarded(extension.process_stop)

    def _task_postrun(
        self, task: Any = None, task_id: str = "", state: str = "", retval: Any = None, **_: Any
    ) -> None:
        self.task_done(task, task_id, state, retval)


def _guarded(method: Callable[..., None], *args: Any) -> None:
    try:
        method(*args)
    except Exception as exc:  # one broken extension must not stop the others or the worker
        owner = type(getattr(method, "__self__", None)).__name__
        logger.critical("extension %s.%s failed: %s: %s", owner, method.__name__, type(exc).__name__, exc)
