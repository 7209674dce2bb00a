"""The outage state, the hold's limits, the watcher's two log lines and the retry delay, in process (fast half)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from celery.exceptions import Reject

from forwarder.health import HealthFiles, check_live, check_ready
from forwarder.model_attempts import RetryPolicy
from forwarder.model_outage import ENDED, STARTED, ModelOutage, OutageWatcher, outage_changed


def test_the_first_failure_starts_the_outage_and_the_watcher_ends_it():
    outage = ModelOutage(max_wait=60, poll_interval=0.01)
    assert not outage.away and outage.waiting == 0
    assert outage.mark_away("refused") is True
    assert outage.mark_away("reset") is False  # one outage, one reason: the first
    assert outage.away and outage.reason == "refused"
    time.sleep(0.05)
    assert outage.mark_back() >= 0.05
    assert not outage.away and outage.mark_back() == 0.0


def test_a_task_waits_while_the_model_is_away_and_is_counted_as_waiting():
    outage = ModelOutage(max_wait=60, poll_interval=0.01)
    assert outage.wait("t") == 0.0  # available: no wait at all
    outage.mark_away("refused")
    seen: list[int] = []
    waiter = threading.Thread(target=lambda: seen.append(int(outage.wait("t") * 1000)))
    waiter.start()
    time.sleep(0.2)
    assert outage.waiting == 1
    outage.mark_back()
    waiter.join(5)
    assert seen and seen[0] >= 150 and outage.waiting == 0


def test_a_task_is_handed_back_after_the_limit_counting_earlier_waits():
    outage = ModelOutage(max_wait=0.3, poll_interval=0.01)
    outage.mark_away("refused")
    started = time.monotonic()
    with pytest.raises(Reject) as caught:
        outage.wait("t", waited=0.2)
    assert caught.value.requeue is True
    assert time.monotonic() - started < 0.3  # 0.2 s were already spent in an earlier hold
    assert outage.waiting == 0


def test_a_warm_shutdown_hands_a_waiting_task_back_at_once():
    outage = ModelOutage(max_wait=600, poll_interval=0.01)
    outage.mark_away("refused")
    threading.Timer(0.1, outage.mark_stopping).start()
    started = time.monotonic()
    with pytest.raises(Reject, match="shutting down"):
        outage.wait("t")
    assert time.monotonic() - started < 1


def test_a_check_may_end_the_wait():
    outage = ModelOutage(max_wait=600, poll_interval=0.01)
    outage.mark_away("refused")

    def expired() -> None:
        raise RuntimeError("expired")

    with pytest.raises(RuntimeError, match="expired"):
        outage.wait("t", check=expired)


def test_the_watcher_logs_one_line_at_each_end_and_signals_both(caplog, tmp_path):
    outage = ModelOutage(max_wait=600, poll_interval=0.01)
    answers = iter([False] * 5 + [True])
    watcher = OutageWatcher(outage, lambda: (next(answers), "refused"), "http://model/readyz")
    events: list[tuple[str, float]] = []

    def receiver(sender=None, event="", seconds=0.0, **_):  # noqa: ANN001, ANN202
        events.append((event, seconds))

    outage_changed.connect(receiver, weak=False, dispatch_uid="test.outage")
    try:
        with caplog.at_level(logging.INFO, logger="forwarder.model_outage"):
            watcher.tick()  # available: nothing
            outage.mark_away("refused")
            for _ in range(6):
                watcher.tick()
    finally:
        outage_changed.disconnect(receiver, dispatch_uid="test.outage")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("model server unreachable (refused)") and "intake paused" in lines[0]
    assert lines[1].startswith("model server back after")
    assert [e for e, _ in events] == [STARTED, ENDED] and not outage.away


def test_probe_ready_fails_while_the_model_is_away_and_live_does_not(tmp_path):
    files = HealthFiles(str(tmp_path))
    files.reset()
    files.beat()
    files.mark_ready()
    assert check_ready(files, 60)[0]
    files.mark_model_away(True)
    ready, line = check_ready(files, 60)
    assert not ready and "model server is away" in line
    assert check_live(files, 60)[0]
    files.mark_model_away(False)
    assert check_ready(files, 60)[0]


@pytest.mark.parametrize(("retry_after", "low", "high"), [("3", 3, 3), ("120", 10, 10), ("soon", 0, 4), (None, 0, 4)])
def test_the_retry_delay_follows_retry_after_capped_else_the_backoff(retry_after, low, high):
    policy = RetryPolicy(statuses=frozenset({503}), retries=5, backoff=2, backoff_max=10)
    delay = policy.delay(retry_after, attempt=1)
    assert low <= delay <= high
