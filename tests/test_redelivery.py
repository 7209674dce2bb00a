"""The redelivery sweep's pace, in process: how often ``RestoreUnacked`` sweeps, and that the step schedules it so.

The worker-level proof (a SIGKILLed worker's messages come back within the visibility timeout and a sweep or
two) is ``tests/test_faults.py``; its wait is derived from the same numbers, so a slower sweep fails it too.
Here: ``sweep_interval`` itself, and the step as the worker starts it, on a consumer whose timer records what
it is asked to schedule (Celery's timer is not what is under test; our step's choice of interval is).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from forwarder.app import build_app
from forwarder.extensions import default_extensions
from forwarder.extensions.redelivery import RedeliverySweep, RestoreUnacked, sweep_interval
from forwarder.settings import Settings


@pytest.mark.parametrize(("visibility", "seconds"), [
    (0.5, 1.0),  # never more often than once a second
    (1, 1.0),
    (2, 1.0),
    (3, 1.5),  # half the visibility timeout ...
    (7, 3.5),
    (20, 10.0),
    (3600, 10.0),  # ... and never less often than every 10 s (the default timeout: one hour)
    (86400, 10.0),  # llm-engine's 24 h
])
def test_the_sweep_runs_every_half_visibility_timeout_between_one_and_ten_seconds(visibility, seconds):
    assert sweep_interval(visibility) == seconds


class RecordingTimer:
    """Stands in for the consumer's ``kombu.asynchronous.timer.Timer``: records each ``call_repeatedly``."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[float, Any, tuple[Any, ...]]] = []
        self.cancelled = 0

    def call_repeatedly(self, secs: float, fun: Any, args: tuple[Any, ...] = (), kwargs: Any = None,
                        priority: int = 0) -> Any:
        self.scheduled.append((secs, fun, tuple(args)))
        return SimpleNamespace(cancel=self._cancel)

    def _cancel(self) -> None:
        self.cancelled += 1


def started_step(**env: str) -> tuple[RestoreUnacked, RecordingTimer, Any]:
    """The sweep step as the worker adds and starts it: the app from ``build_app``, the step from the
    extension the worker installs, ``start`` with a consumer whose timer records."""
    settings = Settings.from_env(env)
    app = build_app(settings)
    (sweep,) = [ext for ext in default_extensions() if isinstance(ext, RedeliverySweep)]
    sweep.install(app, settings)
    assert RestoreUnacked in app.steps["consumer"]  # the step the worker's consumer will start
    consumer = SimpleNamespace(app=app, timer=RecordingTimer(), task_consumer=None)
    step = RestoreUnacked(consumer)
    step.start(consumer)
    return step, consumer.timer, consumer


@pytest.mark.parametrize(("visibility", "seconds"), [("3", 1.5), ("2", 1.0), ("20", 10.0), (None, 10.0)])
def test_the_step_schedules_its_sweep_at_that_interval_from_the_apps_visibility_timeout(visibility, seconds):
    env = {"CELERY_BROKER_VISIBILITY_TIMEOUT": visibility} if visibility else {}
    step, timer, consumer = started_step(**env)
    assert consumer.app.conf.broker_transport_options["visibility_timeout"] == float(visibility or 3600)
    # One repeating timer, at the interval (literal here: a slower sweep in either place fails this) ...
    (scheduled,) = timer.scheduled
    assert scheduled == (seconds, step._tick, (consumer,))  # RepeatingStep: tick() -> sweep()
    # ... cancelled at stop; a sweep with no channel yet does nothing and raises nothing.
    step.sweep(consumer)
    step.stop(consumer)
    assert timer.cancelled == 1 and step.tref is None


def test_on_sqs_no_sweep_step_is_added():
    settings = Settings.from_env({"CELERY_BROKER_URL": "sqs://", "CELERY_SQS_QUEUE_URL": "http://127.0.0.1:1/q"})
    app = build_app(settings)
    RedeliverySweep().install(app, settings)
    assert RestoreUnacked not in app.steps["consumer"]
