"""CachedClient: one build per process and credential lifetime, under threads, greenlets and fork.

Pure and fast: an injectable clock stands in for time, and builds return plain objects.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateways.cached_client import CachedClient, ClientUnavailable

ROOT = Path(__file__).resolve().parent.parent
HOUR = timedelta(hours=1)
LEEWAY = timedelta(minutes=10)


class FakeClock:
    """An aware clock that moves only when told."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class Client:
    """A stand-in client remembering which build and process made it."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.pid = os.getpid()
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Builder:
    """A build function whose results (clients, expiries, failures) the test scripts."""

    def __init__(self, clock: FakeClock, lifetime: timedelta | None = HOUR, delay: float = 0.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.delay = delay
        self.calls = 0
        self.fail_with: BaseException | None = None
        self.lock = threading.Lock()

    def __call__(self) -> tuple[Client, datetime | None]:
        with self.lock:
            self.calls += 1
            serial = self.calls
        if self.delay:
            time.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        expiry = None if self.lifetime is None else self.clock() + self.lifetime
        return Client(serial), expiry


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_cache(builder: Builder, clock: FakeClock, **kwargs: object) -> CachedClient[Client]:
    return CachedClient("test", builder, leeway=LEEWAY, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_builds_once_and_reuses_until_the_leeway(clock: FakeClock) -> None:
    builder = Builder(clock)
    cache = make_cache(builder, clock)
    first = cache.get()
    clock.advance(minutes=49)
    assert cache.get() is first
    assert builder.calls == 1 and cache.builds == 1


def test_rebuilds_inside_the_leeway(clock: FakeClock) -> None:
    builder = Builder(clock)
    cache = make_cache(builder, clock)
    first = cache.get()
    clock.advance(minutes=51)  # 9 minutes before expiry: inside the 10 minute leeway
    second = cache.get()
    assert second is not first and second.serial == 2
    assert cache.get() is second
    assert builder.calls == 2 and cache.builds == 2


def test_never_expiring_client_is_built_once(clock: FakeClock) -> None:
    builder = Builder(clock, lifetime=None)
    cache = make_cache(builder, clock)
    first = cache.get()
    clock.advance(days=400)
    assert cache.get() is first and builder.calls == 1


def test_leeway_longer_than_the_lifetime_does_not_rebuild_on_every_call(clock: FakeClock) -> None:
    # FIREHOSE_REFRESH_LEEWAY >= FIREHOSE_SESSION_DURATION must not turn into one build per task.
    builder = Builder(clock, lifetime=timedelta(minutes=15))
    cache = CachedClient("test", builder, leeway=timedelta(hours=1), clock=clock)
    first = cache.get()
    for _ in range(100):
        assert cache.get() is first
    clock.advance(minutes=7)
    assert cache.get() is first  # refreshed at half the lifetime at the latest
    clock.advance(minutes=1)
    assert cache.get() is not first
    assert builder.calls == 2


def test_failed_rebuild_keeps_the_old_client_and_backs_off(clock: FakeClock) -> None:
    builder = Builder(clock)
    cache = make_cache(builder, clock, backoff_initial=1.0, backoff_max=60.0)
    first = cache.get()
    clock.advance(minutes=55)
    builder.fail_with = ConnectionError("sts down")
    assert cache.get() is first  # refresh failed: still valid for 5 minutes, keep serving it
    assert builder.calls == 2
    for _ in range(20):  # within the 1 s backoff: no new attempt
        assert cache.get() is first
    assert builder.calls == 2
    clock.advance(seconds=1.5)
    assert cache.get() is first  # backoff over: one more (failing) attempt, next backoff is 2 s
    assert builder.calls == 3
    clock.advance(seconds=1.5)
    assert cache.get() is first and builder.calls == 3
    clock.advance(seconds=1)
    builder.fail_with = None
    fresh = cache.get()
    assert fresh is not first and builder.calls == 4 and cache.builds == 2
    assert not first.closed  # other callers may still be mid-call on it


def test_failure_with_no_valid_client_raises_then_unavailable_during_backoff(clock: FakeClock) -> None:
    builder = Builder(clock)
    builder.fail_with = ConnectionError("sts down")
    cache = make_cache(builder, clock, backoff_initial=2.0)
    with pytest.raises(ConnectionError, match="sts down"):
        cache.get()
    with pytest.raises(ClientUnavailable, match="sts down"):
        cache.get()
    clock.advance(seconds=1.9)
    with pytest.raises(ClientUnavailable):
        cache.get()
    assert builder.calls == 1
    clock.advance(seconds=0.2)
    builder.fail_with = None
    assert cache.get().serial == 2
    assert builder.calls == 2 and cache.builds == 1


def test_expired_client_is_never_returned_when_the_refresh_fails(clock: FakeClock) -> None:
    builder = Builder(clock)
    cache = make_cache(builder, clock)
    cache.get()
    clock.advance(minutes=61)  # past the expiry itself
    builder.fail_with = ConnectionError("sts down")
    with pytest.raises(ConnectionError):
        cache.get()
    with pytest.raises(ClientUnavailable):
        cache.get()


def test_close_closes_and_the_next_get_rebuilds(clock: FakeClock) -> None:
    builder = Builder(clock)
    cache = make_cache(builder, clock)
    first = cache.get()
    cache.close()
    assert first.closed
    assert cache.get() is not first and builder.calls == 2


def test_50_threads_at_once_cause_exactly_one_build(clock: FakeClock) -> None:
    builder = Builder(clock, delay=0.3)
    cache = make_cache(builder, clock)
    barrier = threading.Barrier(50)
    got: list[Client] = []
    errors: list[BaseException] = []

    def call() -> None:
        barrier.wait(timeout=10)
        try:
            got.append(cache.get())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors
    assert len(got) == 50 and len({id(client) for client in got}) == 1
    assert builder.calls == 1 and cache.builds == 1


def test_refreshing_a_valid_client_does_not_block_other_threads(clock: FakeClock) -> None:
    builder = Builder(clock)
    cache = make_cache(builder, clock)
    old = cache.get()
    clock.advance(minutes=55)
    builder.delay = 1.0
    refresher = threading.Thread(target=cache.get)
    refresher.start()
    time.sleep(0.1)  # the refresher holds the lock, sleeping in the build
    started = time.monotonic()
    assert cache.get() is old
    assert time.monotonic() - started < 0.5
    refresher.join(timeout=5)
    assert cache.get() is not old and builder.calls == 2




def test_50_greenlets_at_once_cause_exactly_one_build() -> None:
    pytest.importorskip("gevent")
    # Monkey-patching is process-global: run the greenlets in a child interpreter; it asserts, we read its exit code.
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "children" / "gevent_cached_client.py")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _run_in_fork(child: object) -> int:
    """Fork; the child runs ``child()`` (an exit code) under a 10 s alarm; return the child's exit code."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 99
        try:
            signal.alarm(10)  # a deadlocked child dies instead of hanging the suite
            code = child()  # type: ignore[operator]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_never_gets_the_parents_client() -> None:
    cache: CachedClient[Client] = CachedClient("fork-test", lambda: (Client(0), None))
    parent_client = cache.get()
    assert parent_client.pid == os.getpid()

    def child() -> int:
        client = cache.get()
        if client is parent_client or client.pid != os.getpid():
            return 1
        if cache.builds != 1 or cache.get() is not client:
            return 2
        return 0

    assert _run_in_fork(child) == 0
    assert cache.get() is parent_client and cache.builds == 1  # the parent is untouched


def test_fork_during_a_build_in_another_thread_does_not_deadlock_the_child() -> None:
    calls = []

    def build() -> tuple[Client, None]:
        calls.append(os.getpid())
        if len(calls) == 1:
            time.sleep(0.6)  # the parent's builder holds the lock across the fork
        return Client(len(calls)), None

    cache: CachedClient[Client] = CachedClient("fork-lock-test", build)
    builder = threading.Thread(target=cache.get)
    builder.start()
    time.sleep(0.2)

    def child() -> int:
        client = cache.get()  # a fresh lock in the child: no wait for the parent's thread
        return 0 if client.pid == os.getpid() and cache.builds == 1 else 1

    assert _run_in_fork(child) == 0
    builder.join(timeout=5)
    assert cache.builds == 1
