"""One client per process and credential set: built lazily, rebuilt before it expires, closed at exit.

Every client the worker holds (HTTP sessions, Firehose, S3) goes through ``CachedClient``, so it is
built once per process, never per task.

Rules kept here:
- ``build`` is pure: it returns ``(client, expiry)`` and touches no state. The cache installs both
  together under a double-checked lock, so concurrent callers (threads, or greenlets under gevent,
  where ``threading.Lock`` is patched) cause exactly one build, and a failed build never advances the
  expiry past a client that was not installed.
- A rebuild that fails while the old client is still valid keeps serving the old client, and the
  next try waits for an exponential backoff instead of hammering the credential service on every call.
- While one caller rebuilds an expiring-but-valid client, others keep using the old one (no waiting
  behind network I/O).
- The rebuild starts ``leeway`` before the expiry, but never later than half-way through the client's
  lifetime, so a leeway as long as the credentials' lifetime cannot turn into one build per call.
- Fork safety: each cache remembers the process that filled it. In a forked child the first call
  forgets the parent's client (its sockets and credentials are never used, nor closed, by the child)
  and starts over with a fresh lock, as redis-py's connection pools do. No at-fork hook is needed.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from gateways.errors import GatewayError, release_exception

T = TypeVar("T")
Clock = Callable[[], datetime]

logger = logging.getLogger(__name__)
_ALL: weakref.WeakSet[CachedClient[object]] = weakref.WeakSet()


class ClientUnavailable(GatewayError):
    """No usable client: the last build failed and the backoff has not elapsed yet."""


def utcnow() -> datetime:
    """The default clock: aware UTC now."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Installed(Generic[T]):
    client: T
    expiry: datetime | None  # None: never expires
    refresh_at: datetime | None  # when to start rebuilding; None: never


class CachedClient(Generic[T]):
    """Hold one client built by ``build`` and hand it out until it nears expiry.

    Parameters:
        name: for logs.
        build: pure factory returning ``(client, expiry)``; expiry is an aware datetime or None.
        leeway: rebuild this long before the expiry.
        close: how to close a client (default: its ``close()`` method, if any).
        clock: returns aware "now"; injectable for tests.
        backoff_initial, backoff_max: seconds between failed builds (doubling).
    """

    def __init__(
        self,
        name: str,
        build: Callable[[], tuple[T, datetime | None]],
        *,
        leeway: timedelta = timedelta(0),
        close: Callable[[T], None] | None = None,
        clock: Clock = utcnow,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        self.name = name
        self._build = build
        self._leeway = leeway
        self._close = close
        self._clock = clock
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._reset()
        _ALL.add(self)  # type: ignore[arg-type]

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._installed: _Installed[T] | None = None
        self._failures = 0
        self._retry_at: datetime | None = None
        #: What the last failed build raised, as text: never the exception, whose traceback would keep the
        #: frames of the task that triggered the build (its request and answer) alive until the next build.
        self._last_failure = ""
        self._builds = 0

    # ------------------------------------------------------------------------------ public API

    @property
    def builds(self) -> int:
        """How many builds succeeded in this process (for tests and diagnostics)."""
        return self._builds if self._pid == os.getpid() else 0

    def get(self) -> T:
        """Return the cached client, building or refreshing it first if needed.

        Raises:
            ClientUnavailable: no valid client, and the last build failed less than a backoff ago.
            Exception: whatever ``build`` raised, when there is no valid client to fall back on.
        """
        if self._pid != os.getpid():
            self._reset()  # a forked child: never the parent's client, nor its (maybe held) lock
        installed = self._installed
        if installed is not None and self._fresh(installed):
            return installed.client
        usable = installed is not None and self._valid(installed)
        # An expiring-but-valid client: whoever gets the lock refreshes, the rest use the old one.
        if not self._lock.acquire(blocking=not usable):
            return installed.client  # type: ignore[union-attr]
        try:
            return self._refresh_locked()
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close and forget the client (the next ``get`` builds a new one)."""
        if self._pid != os.getpid():
            self._reset()  # the parent's client is the parent's to close
            return
        with self._lock:
            installed, self._installed = self._installed, None
        if installed is not None:
            self._close_client(installed.client)

    # ------------------------------------------------------------------------------ internals

    def _refresh_locked(self) -> T:
        installed = self._installed
        if installed is not None and self._fresh(installed):
            return installed.client  # someone else refreshed while we waited
        now = self._clock()
        usable = installed is not None and self._valid(installed)
        if self._retry_at is not None and now < self._retry_at:
            if usable:
                return installed.client  # type: ignore[union-attr]
            raise ClientUnavailable(
                f"{self.name}: last build failed ({self._last_failure}); next try after {self._retry_at:%H:%M:%S}"
            )
        try:
            client, expiry = self._build()
        except Exception as exc:
            # The backoff runs from the failure: a build slower than the backoff (STS timing out) must not
            # leave it already elapsed, which would make every caller try again at once.
            self._note_failure(self._clock(), exc)
            if not usable:
                raise  # nothing to fall back on: the caller reports it (the hook runner also releases it)
            logger.warning(
                "%s: refresh failed (%s); keeping the current client, valid until %s",
                self.name, _describe(exc), installed.expiry,  # type: ignore[union-attr]
            )
            release_exception(exc)
            return installed.client  # type: ignore[union-attr]
        self._installed = _Installed(client, expiry, self._refresh_time(expiry))
        self._failures, self._retry_at, self._last_failure = 0, None, ""
        self._builds += 1
        # The old client is not closed here: other greenlets may still be mid-call on it; the GC
        # closes it once the last of them lets go.
        logger.info("%s: client built (pid %d, expires %s)", self.name, os.getpid(), expiry or "never")
        return client

    def _note_failure(self, now: datetime, exc: BaseException) -> None:
        self._failures += 1
        delay = min(self._backoff_max, self._backoff_initial * 2 ** (self._failures - 1))
        self._retry_at = now + timedelta(seconds=delay)
        self._last_failure = _describe(exc)

    def _refresh_time(self, expiry: datetime | None) -> datetime | None:
        # Rebuild ``leeway`` before the expiry, but never later than half-way through the client's
        # lifetime: with a leeway as long as the credentials' lifetime (FIREHOSE_REFRESH_LEEWAY >=
        # FIREHOSE_SESSION_DURATION), ``expiry - leeway`` would already be past at build time and
        # every call would rebuild, which is the per-task-client incident all over again.
        if expiry is None:
            return None
        lifetime = expiry - self._clock()
        return expiry - min(self._leeway, max(lifetime, timedelta(0)) / 2)

    def _fresh(self, installed: _Installed[T]) -> bool:
        return installed.refresh_at is None or self._clock() < installed.refresh_at

    def _valid(self, installed: _Installed[T]) -> bool:
        return installed.expiry is None or self._clock() < installed.expiry

    def _close_client(self, client: T) -> None:
        try:
            if self._close is not None:
                self._close(client)
            elif hasattr(client, "close"):
                client.close()
        except Exception as exc:  # closing is best effort at shutdown
            logger.warning("%s: close failed: %s", self.name, _describe(exc))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def close_all() -> None:
    """Close every cached client of this process (worker shutdown)."""
    for cache in list(_ALL):
        cache.close()
