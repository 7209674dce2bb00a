"""DogStatsD metrics to the local Datadog agent: fire-and-forget, one client per process.

The client is ddtrace's DogStatsd (``ddtrace.vendor.dogstatsd``: datadogpy's client, which ddtrace ships
and uses for its own runtime metrics; ddtrace is already the worker's launcher, so no new dependency).
Rules kept here:

- Never blocks, never raises: the socket has a zero timeout (a full send buffer drops the packet:
  ``EAGAIN``), every send error is dropped by the client, and anything else is caught here. With no agent
  listening, the worker behaves the same.
- One client per process, built on first use (``CachedClient``: a prefork child builds its own, never the
  parent's socket). ddtrace is imported only then, and only when metrics are on. Under gevent the socket
  is gevent's (``socket`` is patched before anything is imported, see ``forwarder.pool_bootstrap``).
- Destination: ``url`` (``DD_DOGSTATSD_URL``: ``udp://host:port`` or ``unix:///path``), else ``host``:``port``
  (``DD_AGENT_HOST``, ``DD_DOGSTATSD_PORT``). The client adds ``env``/``service``/``version`` tags from
  ``DD_ENV``/``DD_SERVICE``/``DD_VERSION`` itself, as every Datadog client does.
"""

from __future__ import annotations

import logging
import socket
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


class Metrics:
    """Counters, gauges and distributions sent to DogStatsD; a no-op when ``enabled`` is False.

    Every method returns at once and never raises.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        host: str = "localhost",
        port: int = 8125,
        url: str = "",
        tags: Sequence[str] = (),
    ) -> None:
        self.enabled = enabled
        self.host, self.port, self.socket_path = parse_url(url) if url else (host, port, None)
        self.tags = [tag for tag in tags if tag]
        self._client: CachedClient[Any] | None = (
            CachedClient("dogstatsd", self._build, close=_close) if enabled else None
        )

    def increment(self, name: str, value: float = 1, tags: Sequence[str] = ()) -> None:
        self._send("increment", name, value, tags)

    def gauge(self, name: str, value: float, tags: Sequence[str] = ()) -> None:
        self._send("gauge", name, value, tags)

    def distribution(self, name: str, value: float, tags: Sequence[str] = ()) -> None:
        self._send("distribution", name, value, tags)

    def client(self) -> Any:
        """This process's DogStatsd client (built on first use); None when metrics are off."""
        return self._client.get() if self._client is not None else None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _send(self, kind: str, name: str, value: float, tags: Sequence[str]) -> None:
        if self._client is None:
            return
        try:
            getattr(self._client.get(), kind)(name, value, tags=list(tags) or None)
        except Exception as exc:  # a metric must never fail or slow a task
            release_exception(exc)

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
            disable_buffering=True,  # each metric leaves at once: nothing to flush, no thread
        )
        return client, None


    def _address(self) -> str:
        """The agent's address, resolved once per build: the client would resolve a name again after every
        send error (a DNS lookup per metric when no agent listens); a failure here backs off instead."""
        if self.socket_path is not None:
            return "localhost"  # unused
        found = socket.getaddrinfo(self.host or "localhost", self.port, 0, socket.SOCK_DGRAM)
        found.sort(key=lambda info: info[0] == socket.AF_INET, reverse=True)  # IPv4 first, as the client does
        return str(found[0][4][0])


def _close(client: Any) -> None:
    client.close_socket()
