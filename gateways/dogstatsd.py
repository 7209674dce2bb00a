"""DogStatsD metrics to the local Datadog agent: aggregated in the process, flushed on an interval, never blocking.

The sender is ddtrace's DogStatsd (``ddtrace.vendor.dogstatsd``: datadogpy's client, which ddtrace ships and uses for
its own runtime metrics; ddtrace is already the worker's launcher, so no new dependency). That copy buffers but
does not aggregate (datadogpy's own ``disable_aggregation=False`` is not in it), so the aggregation is here,
in front of it, as datadogpy does it:

- **Aggregated in the process.** A counter is summed and a gauge keeps its last value per metric and tag set;
  a distribution keeps every sample (Datadog computes its percentiles over all of them: batched, never
  dropped). Recording one is a dict update under a lock: no formatting, no socket, no system call on a
  task's path.
- **Flushed every ``flush_interval`` seconds** (1 s) by one daemon thread per process, started on the first
  metric (under gevent, patched first, that thread is a greenlet), and at ``close`` (each process's stop:
  prefork children and warm shutdowns included). A flush formats each metric once through the client, whose
  buffer packs the lines into datagrams of up to 1,432 bytes (UDP; 8,192 on a unix socket).
- **Never blocks, never raises.** The socket has a zero timeout: a full send buffer drops the datagram
  (``EAGAIN``), and the client drops every send error; anything else is caught here. With no agent listening
  the worker behaves the same, and only the flusher notices (once a second, not per metric).
- **One client and one aggregate per process.** The client is built on first use (``CachedClient``: a
  prefork child builds its own, never the parent's socket); after a fork the child starts with an empty
  aggregate, a fresh lock and no flusher (``os.register_at_fork``), so nothing of the parent's is sent twice.
  ddtrace is imported only when metrics are on.
- Destination: ``url`` (``DD_DOGSTATSD_URL``: ``udp://host:port`` or ``unix:///path``), else ``host``:``port``
  (``DD_AGENT_HOST``, ``DD_DOGSTATSD_PORT``). The client adds ``env``/``service``/``version`` tags from
  ``DD_ENV``/``DD_SERVICE``/``DD_VERSION`` itself, as every Datadog client does.
- Tags are passed as tuples built once by the caller where they are constant (``extensions.metrics``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from gateways.cached_client import CachedClient
from gateways.errors import release_exception

logger = logging.getLogger(__name__)

#: The vendored client logs a warning per dropped packet when no agent listens (ICMP refusals): a dropped
#: packet is expected here, so only its errors are logged.
_CLIENT_LOGGER = "ddtrace.vendor.dogstatsd"


def parse_url(url: str) -> tuple[str, int | None, str | None]:
    """``(host, port, socket_path)`` of a ``DD_DOGSTATSD_URL`` (``udp://host:port`` or ``unix:///path``).

    Raises:
        ValueError: another scheme, a UDP URL without a host, or a unix URL without a path.
    """
    parts = urlsplit(url.strip())
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ValueError("must name a socket path: unix:///var/run/datadog/dsd.socket")
        return "", None, path
    if parts.scheme == "udp":
        if not parts.hostname:
            raise ValueError("must name a host: udp://host:port")
        return parts.hostname, parts.port or 8125, None
    raise ValueError("must be a URL with scheme udp or unix")


#: Seconds between flushes of a process's aggregate.
FLUSH_INTERVAL = 1.0

Key = tuple[str, tuple[str, ...]]
_ALL: weakref.WeakSet[Metrics] = weakref.WeakSet()


class Metrics:
    """Counters, gauges and distributions, aggregated and sent to DogStatsD; a no-op when ``enabled`` is False.

    Every method returns at once and never raises. ``flushes`` counts the flushes that sent something in
    this process (tests pin it).
    """

    _lock: threading.Lock
    _counts: dict[Key, float]
    _gauges: dict[Key, float]
    _samples: dict[Key, list[float]]
    _flusher: threading.Thread | None
    _stop: threading.Event
    flushes: int

    def __init__(
        self,
        *,
        enabled: bool = True,
        host: str = "localhost",
        port: int = 8125,
        url: str = "",
        tags: Sequence[str] = (),
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.enabled = enabled
        self.host, self.port, self.socket_path = parse_url(url) if url else (host, port, None)
        self.tags = [tag for tag in tags if tag]
        self.flush_interval = flush_interval
        self._client: CachedClient[Any] | None = (
            CachedClient("dogstatsd", self._build, close=_close) if enabled else None
        )
        self._reset_after_fork()
        _ALL.add(self)

    def increment(self, name: str, value: float = 1, tags: Sequence[str] = ()) -> None:
        if self._client is None:
            return
        key = (name, tags if type(tags) is tuple else tuple(tags))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + value
        if self._flusher is None:
            self._start_flusher()

    def gauge(self, name: str, value: float, tags: Sequence[str] = ()) -> None:
        if self._client is None:
            return
        key = (name, tags if type(tags) is tuple else tuple(tags))
        with self._lock:
            self._gauges[key] = value
        if self._flusher is None:
            self._start_flusher()

    def distribution(self, name: str, value: float, tags: Sequence[str] = ()) -> None:
        if self._client is None:
            return
        key = (name, tags if type(tags) is tuple else tuple(tags))
        with self._lock:
            samples = self._samples.get(key)
            if samples is None:
                self._samples[key] = [value]
            else:
                samples.append(value)
        if self._flusher is None:
            self._start_flusher()

    def client(self) -> Any:
        """This process's DogStatsd client (built on first use); None when metrics are off."""
        return self._client.get() if self._client is not None else None

    def flush(self) -> None:
        """Send what was aggregated since the last flush (in the calling thread); never raises."""
        with self._lock:
            counts, gauges, samples = self._counts, self._gauges, self._samples
            self._counts, self._gauges, self._samples = {}, {}, {}
        if self._client is None or not (counts or gauges or samples):
            return
        self.flushes += 1
        try:
            client = self._client.get()
            for (name, tags), value in counts.items():
                client.increment(name, value, tags=list(tags) or None)
            for (name, tags), value in gauges.items():
                client.gauge(name, value, tags=list(tags) or None)
            for (name, tags), values in samples.items():
                listed = list(tags) or None
                for value in values:
                    client.distribution(name, value, tags=listed)
            client.flush()
        except Exception as exc:  # a metric must never fail or stop the flusher
            release_exception(exc)

    def close(self) -> None:
        """Stop the flusher, send what is left, close the socket (each process's stop)."""
        self._stop.set()
        self.flush()
        if self._client is not None:
            self._client.close()

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is not None or self._stop.is_set():
                return
            self._flusher = threading.Thread(target=self._flush_every_interval, name="dogstatsd-flush", daemon=True)
        self._flusher.start()

    def _flush_every_interval(self) -> None:
        stop = self._stop
        while not stop.wait(self.flush_interval):
            self.flush()

    def _reset_after_fork(self) -> None:
        """A new process (or a forked child): an empty aggregate, a fresh lock, no flusher yet."""
        self._lock = threading.Lock()
        self._counts = {}
        self._gauges = {}
        self._samples = {}
        self._flusher = None
        self._stop = threading.Event()
        self.flushes = 0

    def _build(self) -> tuple[Any, datetime | None]:
        from ddtrace.vendor.dogstatsd import DogStatsd  # imported only where metrics are on

        logging.getLogger(_CLIENT_LOGGER).setLevel(logging.ERROR)
        client = DogStatsd(
            host=self._address(),
            port=self.port or 8125,
            socket_path=self.socket_path,
            constant_tags=list(self.tags),
            socket_timeout=0,  # never wait: a full buffer drops the packet
            disable_telemetry=True,  # no client-telemetry packets besides ours
            disable_buffering=False,  # lines packed into datagrams, sent by our flush ...
            flush_interval=0,  # ... only: no thread of the client's own
        )
        return client, None

    def _address(self) -> str:
        """The agent's address, resolved once per build: the client would resolve a name again after every
        send error; a failure here backs off instead."""
        if self.socket_path is not None:
            return "localhost"  # unused
        found = socket.getaddrinfo(self.host or "localhost", self.port, 0, socket.SOCK_DGRAM)
        found.sort(key=lambda info: info[0] == socket.AF_INET, reverse=True)  # IPv4 first, as the client does
        return str(found[0][4][0])


def _close(client: Any) -> None:
    client.close_socket()


def _after_fork_in_child() -> None:
    for metrics in list(_ALL):
        metrics._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
