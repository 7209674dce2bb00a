"""Callback delivery: POST a finished task's result to a URL chosen by the request's author.

The URL is user input, so every delivery is guarded against server-side request forgery (SSRF):

- Only ``http``/``https`` URLs without ``user:password@`` are accepted.
- The host is resolved and **every** address it resolves to is checked. With an allow-list (host
  names, IPs or CIDRs), the host name or every address must match an entry. Without one, loopback,
  link-local (incl. the 169.254.169.254 metadata service), private, unique-local, unspecified,
  multicast, reserved and other non-global addresses are refused, also when embedded in IPv6
  (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, Teredo).
- DNS rebinding: the check is repeated inside the connection, at the moment the socket is opened, and
  the socket connects only to the addresses that check returned (``GuardedHTTPConnection`` and its HTTPS
  twin). The URL, the Host header, TLS SNI and certificate verification are untouched, so HTTPS works as
  usual. There is no window between "check" and "connect" in which a second DNS answer could be used.
- Redirects are not followed; environment proxies, ``.netrc`` and ``REQUESTS_CA_BUNDLE`` are ignored
  (``trust_env = False``): a proxy would resolve the host itself and defeat the check.
A refusal raises ``CallbackRefused`` before any byte is sent.

Every attempt has a (connect, read) timeout; connection errors, timeouts and 5xx answers are retried
with exponential backoff and jitter up to ``attempts`` in all; other answers are final. Errors and
logs name the destination as ``host:port`` only (never the path or query, which may carry tokens) and
never contain the password or the Authorization header.

With a ``WebhookSigner`` (``gateways.webhook_signing``) every attempt is signed in the Standard Webhooks
scheme: the same ``webhook-id`` on each attempt, a fresh ``webhook-timestamp``, and a signature of the exact
bytes sent.

Residual risks (documented, not handled): the timeouts bound each connect and each socket read, not the
whole attempt, so a server trickling its status line byte by byte can hold a slot longer than the
timeout (the response body is read for at most ``timeout`` seconds and 64 KiB); an allow-listed host
*name* is trusted whatever it resolves to.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import random
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.poolmanager import PoolManager
from urllib3.util import connection as urllib3_connection

from gateways.cached_client import CachedClient
from gateways.errors import GatewayError, release_exception
from gateways.webhook_signing import WebhookSigner

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
#: Response bytes read (then discarded) so the connection can be reused.
BODY_LIMIT = 64 * 1024
#: Longest wait between two attempts, in seconds.
BACKOFF_MAX = 30.0
#: Seconds before the second attempt (doubling each time).
BACKOFF_INITIAL = 0.5
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class CallbackError(GatewayError):
    """The callback was not delivered. The message names ``host:port``, never credentials."""

    def __init__(self, message: str, *, attempts: int = 0, status_code: int | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status_code = status_code


class CallbackRefused(CallbackError):
    """The destination is not allowed (scheme, credentials in the URL, or address); nothing was sent."""


# ------------------------------------------------------------------------------ destination guard


def _getaddrinfo(host: str, port: int) -> list[tuple[Any, ...]]:
    """The resolver (looked up at call time, so gevent's patched one is used; tests replace it)."""
    return socket.getaddrinfo(host, port, urllib3_connection.allowed_gai_family(), socket.SOCK_STREAM)


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be called without an allow-list, or None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d on a dual-stack socket
            inner = forbidden_reason(ip.ipv4_mapped)
            return f"IPv4-mapped {inner}" if inner else None
        embedded = (("6to4", ip.sixtofour), ("Teredo", ip.teredo[1] if ip.teredo else None))
        for label, v4 in embedded:
            inner = forbidden_reason(v4) if v4 is not None else None
            if inner:
                return f"{label} {inner}"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local (cloud metadata)" if ip in _METADATA else "link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("non-global", not ip.is_global),  # shared 100.64/10, documentation ranges...
    )
    for reason, hit in checks:
        if hit:
            return reason
    return None


def _normalize_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _in_network(ip: IPAddress, network: IPNetwork) -> bool:
    if ip.version == network.version and ip in network:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped is not None and network.version == 4 and mapped in network


@dataclass(frozen=True)
class Target:
    """An accepted callback URL, split for the checks and the logs."""

    url: str
    scheme: str
    host: str  # normalized: lower case, no brackets, no trailing dot
    port: int

    @property
    def where(self) -> str:
        """``host:port`` for logs and errors (no path or query: they may carry tokens)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class DestinationGuard:
    """Decides whether a callback URL, and every address its host resolves to, may be called."""

    def __init__(self, allowed_hosts: Iterable[str] = ()) -> None:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in allowed_hosts:
            text = entry.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
            except ValueError:
                names.add(_normalize_host(text))
        self.names = frozenset(names)
        self.networks = tuple(networks)
        self.restricted = bool(names or networks)

    def check_url(self, url: str) -> Target:
        """The URL's parts if its form is acceptable (the addresses are checked by ``resolve``).

        Raises:
            CallbackRefused: not http(s), credentials in the URL, no host, or not a valid URL.
        """
        if not isinstance(url, str):
            raise CallbackRefused(f"callback URL must be a string, got {type(url).__name__}")
        prepared = requests.PreparedRequest()
        try:
            scheme = urlsplit(url).scheme.lower()
            if scheme not in SCHEMES:
                raise CallbackRefused(f"callback URL scheme {scheme[:16]!r} is not allowed (http or https only)")
            prepared.prepare_url(url, None)  # what requests will send: IDNA host, quoted path
            parts = urlsplit(prepared.url or "")
            port = parts.port
        except (requests.RequestException, ValueError, UnicodeError):
            raise CallbackRefused("callback URL is not a valid http(s) URL") from None
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise CallbackRefused("callback URL must not contain credentials (user:password@host)")
        if not parts.hostname:
            raise CallbackRefused("callback URL names no host")
        return Target(prepared.url or url, scheme, _normalize_host(parts.hostname), port or DEFAULT_PORTS[scheme])

    def resolve(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and check every address; return them (resolver order) to connect to.

        Raises:
            CallbackRefused: an address (or the host) is not allowed.
            socket.gaierror: the host does not resolve (worth retrying).
        """
        name = _normalize_host(host)
        try:
            literal: IPAddress | None = ipaddress.ip_address(name)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [(literal, name)]
        else:
            addresses = []
            for info in _getaddrinfo(name, port):
                text = str(info[4][0])
                ip = ipaddress.ip_address(text)
                if all(ip != seen for seen, _ in addresses):
                    addresses.append((ip, text))
            if not addresses:
                raise socket.gaierror(socket.EAI_NONAME, f"{name} resolved to no address")
        self._check(name, [ip for ip, _ in addresses])
        return [text for _, text in addresses]

    def _check(self, name: str, ips: Sequence[IPAddress]) -> None:
        shown = f"[{name}]" if ":" in name else name
        if self.restricted:
            if name in self.names:
                return
            for ip in ips:
                if not any(_in_network(ip, network) for network in self.networks):
                    suffix = "" if str(ip) == name else f" (resolves to {ip})"
                    raise CallbackRefused(f"callback host {shown}{suffix} is not in the allowed callback hosts")
            return
        for ip in ips:
            reason = forbidden_reason(ip)
            if reason:
                what = f"address {shown} is" if str(ip) == name else f"host {shown} resolves to {ip}, which is"
                raise CallbackRefused(
                    f"callback {what} {reason}; refused (list it in the allowed callback hosts to permit it)"
                )


# ------------------------------------------------------------------------- pinned HTTP connections


class _GuardedConnectionMixin:
    """Resolve, check and connect in one step, to the checked addresses only (no DNS rebinding).

    Replaces urllib3's ``HTTPConnection._new_conn``; everything after the TCP connect (TLS with SNI and
    certificate checks against the URL's host name, the Host header) is urllib3's own. urllib3 documents
    ``ConnectionCls`` and ``socket_options`` but no hook between resolving and connecting, so the override
    stays; ``tests/test_upstream_contracts.py`` pins ``_new_conn``, ``_dns_host`` and that connect calls it.
    The ``guard`` comes from the pool's connection arguments (``_GuardedPoolManager``).
    """

    _dns_host: str
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def __init__(self, *args: Any, guard: DestinationGuard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        try:
            addresses = self.guard.resolve(self._dns_host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        error: OSError | None = None
        for address in addresses:
            try:
                sock = urllib3_connection.create_connection(
                    (address, self.port), self.timeout,
                    source_address=self.source_address, socket_options=self.socket_options,
                )
            except OSError as exc:
                error = exc
                continue
            sys.audit("http.client.connect", self, self.host, self.port)
            return sock
        if isinstance(error, TimeoutError):
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from error
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}") from error  # type: ignore[arg-type]


class GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    """An HTTP connection to the addresses its guard checked, and no other."""


class GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    """An HTTPS connection to the addresses its guard checked, and no other."""


class GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class _GuardedPoolManager(PoolManager):
    """Opens guarded pools, whose connections get ``guard`` (pool keyword arguments would name a pool key)."""

    def __init__(self, guard: DestinationGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = guard
        self.pool_classes_by_scheme = {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> HTTPConnectionPool:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.conn_kw["guard"] = self.guard  # urllib3 passes conn_kw to each new connection
        return pool


class _GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools open only guarded connections."""

    def __init__(self, guard: DestinationGuard, **kwargs: Any) -> None:
        self._guard = guard  # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)  # its bookkeeping
        self.poolmanager = _GuardedPoolManager(
            self._guard, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs
        )

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # A proxy resolves the host itself, which would bypass the guard; trust_env=False means none
        # is ever configured, and this makes sure.
        raise CallbackRefused("callback requests never go through a proxy")


def build_session(guard: DestinationGuard, pool_size: int, verify: bool | str = True) -> requests.Session:
    """A keep-alive session whose connections are guarded; no urllib3 retries (``send`` retries)."""
    session = requests.Session()
    session.trust_env = False  # no env proxies (they would bypass the guard), no .netrc credentials
    session.verify = verify
    adapter = _GuardedAdapter(guard, pool_connections=10, pool_maxsize=pool_size, max_retries=0, pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# -------------------------------------------------------------------------------------- the client


class CallbackClient:
    """Sends callbacks over one pooled session per process (rebuilt by each prefork child).

    Parameters:
        timeout: seconds for the connect, and again for each read, of one attempt.
        attempts: attempts in all (connection errors, timeouts and 5xx are retried).
        allowed_hosts: host names, IPs or CIDRs; empty: any public address.
        backoff: seconds before the second attempt; doubles each time (with jitter), at most 30 s.
        pool_size: kept-alive connections per callback host (the worker's concurrency).
        verify: TLS verification: True (system/certifi CAs), or a CA bundle path.
        signer: signs every attempt (Standard Webhooks headers, a fresh timestamp each time); None: unsigned.
    """

    def __init__(
        self,
        *,
        timeout: float,
        attempts: int,
        allowed_hosts: tuple[str, ...],
        backoff: float = BACKOFF_INITIAL,
        pool_size: int = 10,
        verify: bool | str = True,
        signer: WebhookSigner | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.guard = DestinationGuard(allowed_hosts)
        self.signer = signer
        self.session = CachedClient(
            "callback-http-session", lambda: (build_session(self.guard, pool_size, verify), None)
        )

    def send(self, url: str, body: dict[str, Any], auth: tuple[str, str] | None, webhook_id: str = "") -> None:
        """POST ``body`` as JSON to ``url``, with HTTP basic ``auth`` if given; return on a 2xx answer.

        With a signer, every attempt carries ``webhook-id`` (``webhook_id``, the same on every attempt),
        its own ``webhook-timestamp`` and the ``webhook-signature`` of the exact bytes sent.

        Raises:
            CallbackRefused: the destination is not allowed (nothing was sent).
            CallbackError: no 2xx answer after the allowed attempts, or a final (3xx/4xx) answer; or a
                signer is set and ``webhook_id`` is not a valid webhook id (nothing was sent).
        """
        target = self.guard.check_url(url)
        if self.signer is not None and not self.signer.valid_id(webhook_id):
            raise CallbackError(f"callback to {target.where} not sent: {webhook_id[:64]!r} is not a valid webhook id")
        try:
            data = json.dumps(body, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise CallbackError(f"callback body for {target.where} is not JSON-serializable: {exc}") from None
        headers = {"Content-Type": "application/json"}
        secrets: list[str] = []
        if auth is not None:
            username, password = auth
            # UTF-8 (RFC 7617), not requests' latin-1, which fails on other characters.
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
            # Too-short values would mangle every message and cannot appear in one by accident anyway.
            secrets = [s for s in (password, token) if len(s) >= 4]
        reason = ""
        for attempt in range(1, self.attempts + 1):
            if self.signer is not None:  # signed now: each attempt has its own timestamp
                headers.update(self.signer.headers(webhook_id, data))
            status, reason = self._attempt(target, data, headers)
            if status is not None and 200 <= status < 300:
                logger.debug("callback to %s answered HTTP %d (attempt %d)", target.where, status, attempt)
                return
            if status is not None and not status >= 500:
                final = "redirects are not followed" if 300 <= status < 400 else "not retried"
                raise CallbackError(
                    _scrub(f"callback to {target.where} answered HTTP {status} ({final})", secrets),
                    attempts=attempt, status_code=status,
                )
            if attempt < self.attempts:
                delay = self._delay(attempt)
                logger.warning(
                    "callback to %s: attempt %d/%d failed (%s); retrying in %.2f s",
                    target.where, attempt, self.attempts, _scrub(reason, secrets), delay,
                )
                time.sleep(delay)
        raise CallbackError(
            _scrub(f"callback to {target.where} failed after {self.attempts} attempt(s): {reason}", secrets),
            attempts=self.attempts, status_code=status,
        )

    def close(self) -> None:
        """Close this process's pooled connections."""
        self.session.close()

    # ------------------------------------------------------------------------------ internals

    def _attempt(self, target: Target, data: bytes, headers: dict[str, str]) -> tuple[int | None, str]:
        """One POST: (HTTP status, "HTTP <status>") or (None, why it failed). Raises CallbackRefused."""
        try:
            # Fail fast with a clear refusal; the connection checks again when it opens a socket.
            self.guard.resolve(target.host, target.port)
        except socket.gaierror as exc:
            return None, f"cannot resolve {target.host} ({exc.strerror or exc})"
        refused: CallbackRefused | None = None
        failure = ""
        response: requests.Response | None = None
        try:
            response = self.session.get().post(
                target.url, data=data, headers=headers, timeout=(self.timeout, self.timeout),
                allow_redirects=False, stream=True,
            )
        except CallbackRefused as exc:  # the connect-time check: the host resolved differently
            refused = CallbackRefused(str(exc))
            release_exception(exc)
        except requests.RequestException as exc:
            failure = self._failure(exc)
            release_exception(exc)  # its frames (urllib3's, then ours) would hold the body and headers
        # Raised out here so no exception keeps the request (and its Authorization header) alive.
        if refused is not None:
            raise refused
        if response is None:
            return None, failure
        try:
            status = response.status_code
            _discard_body(response, time.monotonic() + self.timeout)
        finally:
            response.close()
        return status, f"HTTP {status}"

    def _failure(self, exc: requests.RequestException) -> str:
        """Why one attempt failed, in words (no URL path, no headers)."""
        if isinstance(exc, requests.ConnectTimeout):
            return f"connect timed out after {self.timeout:g} s"
        if isinstance(exc, requests.ReadTimeout):
            return f"no answer within {self.timeout:g} s"
        if isinstance(exc, requests.ConnectionError):
            return f"connection failed ({_root_cause(exc)})"
        return f"request failed ({type(exc).__name__})"

    def _delay(self, attempt: int) -> float:
        ceiling = min(BACKOFF_MAX, self.backoff * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # jitter: replicas do not retry in lockstep


def _discard_body(response: requests.Response, deadline: float) -> None:
    """Read (at most BODY_LIMIT bytes, until ``deadline``) and drop the body, so the socket is reusable."""
    read = 0
    try:
        for chunk in response.iter_content(8192):
            read += len(chunk)
            if read >= BODY_LIMIT or time.monotonic() >= deadline:
                return
    except (requests.RequestException, OSError) as exc:
        release_exception(exc)  # the status is known; a broken body only costs the connection


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error (those carry no URL path or headers)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {exc}"[:300]


def _scrub(text: str, secrets: Sequence[str]) -> str:
    """Belt and braces: no message we build contains a secret, but make sure."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
