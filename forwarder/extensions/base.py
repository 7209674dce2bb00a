"""The extension interface, the ordered runner that wires every extension into Celery once, and the
consumer step that runs something every few seconds on the worker's own timer.

An extension is one concern around every task or process (logs, metrics, probes, guarantees). Each
method is a no-op unless overridden, as in dramatiq's middleware. Celery signals, task methods and
bootsteps stay the mechanism underneath; ``Extensions.install`` is the only place that connects the
signals and task methods, and ``add_step`` the bootsteps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, bootsteps, signals

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


class RepeatingStep(bootsteps.StartStopStep):
    """Consumer step: ``tick(c)`` every ``interval(c)`` seconds on the consumer's timer, never a thread.

    The timer is the consumer's own (``c.timer``): under prefork the timer of kombu's event loop in the main
    process, under gevent a greenlet the hub runs; so a tick runs only while that loop turns. A tick that
    raises is logged and the next one runs. ``owner`` is the extension that added the step (``add_step``);
    Celery builds steps itself, with ``(consumer, **worker options)``, so it is found through the app.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.owner: Any = parent.app.conf.get(owner_key(type(self)))
        self.tref: Any = None

    def interval(self, c: Any) -> float:
        """Seconds between ticks; 0 or less: no timer."""
        raise NotImplementedError

    def tick(self, c: Any) -> None:
        """One run on the consumer's timer."""
        raise NotImplementedError

    def start(self, c: Any) -> None:
        interval = self.interval(c)
        if interval > 0:
            self.tref = c.timer.call_repeatedly(interval, self._tick, (c,))

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop

    def _tick(self, c: Any) -> None:
        try:
            self.tick(c)
        except Exception as exc:  # never stop the timer
            logger.warning("%s failed: %s: %s", type(self).__name__, type(exc).__name__, exc)


def owner_key(step: type[bootsteps.Step]) -> str:
    """Where ``add_step`` keeps a step's owner in the app's configuration: the step's name (its class path)."""
    return f"forwarder.step_owner.{step.name}"


def add_step(app: Celery, step: type[RepeatingStep], owner: Any = None) -> None:
    """Add ``step`` to the consumer of ``app``'s worker; the step reaches ``owner`` as ``self.owner``."""
    app.conf[owner_key(step)] = owner
    app.steps["consumer"].add(step)
