"""A real, toggleable HTTP forward proxy in front of moto (one AWS service at a time) or any HTTP server.

A worker is pointed at it with botocore's service-specific variables (``AWS_ENDPOINT_URL_STS``,
``AWS_ENDPOINT_URL_FIREHOSE``) while every other service keeps ``AWS_ENDPOINT_URL`` (moto). Modes,
switched while the worker runs:

- ``pass``: forward to moto and relay its answer;
- ``down``: nothing listens on the port (connections are refused) and open keep-alive connections are
  cut; switching back listens again on the same port;
- ``throttle``: answer as AWS throttles: HTTP 400 with ``x-amzn-ErrorType: ThrottlingException`` and
  ``{"__type": "ThrottlingException", "message": "Rate exceeded"}`` for JSON-protocol services
  (Firehose), an XML ``ErrorResponse`` with code ``Throttling`` for query-protocol ones (STS);
- ``error500``: HTTP 500 ``InternalFailure``, in the same two shapes.

Every request that reaches the proxy is kept as a ``Hit`` (mode, operation, body) for counting.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from devtools.servers import QuietHandler, free_port

__all__ = ["faulty_proxy", "FaultyProxy", "Hit"]

MODES = ("pass", "down", "throttle", "error500")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "content-length"})
_STS_XMLNS = "https://sts.amazonaws.com/doc/2011-06-15/"


@dataclass(frozen=True)
class Hit:
    """One request that reached the proxy."""

    mode: str  # the mode it was answered in
    operation: str  # "PutRecord" (X-Amz-Target), "AssumeRole" (query Action), else "?"
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


def _operation(headers: Any, body: bytes) -> tuple[str, bool]:
    """(operation name, whether the service speaks the JSON protocol)."""
    target = headers.get("X-Amz-Target")
    if target:
        return target.rpartition(".")[2], True
    action = parse_qs(body.decode("utf-8", "replace")).get("Action", ["?"])[0]
    return action, False


def _fault(mode: str, json_protocol: bool) -> tuple[int, dict[str, str], bytes]:
    """The answer AWS gives for a throttle or an internal failure, in the service's protocol."""
    request_id = str(uuid.uuid4())
    status, code, message = (400, "ThrottlingException", "Rate exceeded") if mode == "throttle" else (
        500, "InternalFailure", "We encountered an internal error. Please try again.")
    if json_protocol:
        body = json.dumps({"__type": code, "message": message}).encode()
        headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-ErrorType": code,
                   "x-amzn-RequestId": request_id}
        return status, headers, body
    code = "Throttling" if mode == "throttle" else code
    kind = "Sender" if status < 500 else "Receiver"
    body = (f'<ErrorResponse xmlns="{_STS_XMLNS}"><Error><Type>{kind}</Type><Code>{code}</Code>'
            f"<Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>").encode()
    return status, {"Content-Type": "text/xml", "x-amzn-RequestId": request_id}, body


class _ProxyHandler(QuietHandler):
    proxy: FaultyProxy

    def setup(self) -> None:
        super().setup()
        self.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.proxy._track(self.connection, False)

    def do_POST(self) -> None:
        self._handle()

    do_GET = do_PUT = do_DELETE = do_HEAD = do_POST

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        operation, json_protocol = _operation(self.headers, body)
        mode = self.proxy._record(Hit(self.proxy.mode, operation, body))
        if mode == "down":  # switched off while this connection was open: no answer, connection cut
            self.close_connection = True
            return
        if mode in ("throttle", "error500"):
            self._reply(*_fault(mode, json_protocol))
            return
        try:
            status, headers, payload = self.proxy._forward(self.command, self.path, self.headers, body)
        except OSError as exc:
            self._reply(502, {"Content-Type": "text/plain"}, f"proxy: upstream failed: {exc}".encode())
            return
        self._reply(status, headers, payload)

    def _reply(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True  # listen again on the same port right after "down"
    daemon_threads = True


class FaultyProxy:
    """Forwards to ``upstream`` (moto) on a fixed 127.0.0.1 port; ``set_mode`` changes what it does."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = free_port()
        self.mode = "pass"
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, mode: str = "pass") -> FaultyProxy:
        self.set_mode(mode)  # listens unless "down"
        return self

    def set_mode(self, mode: str) -> None:
        """Switch now: "down" stops listening and cuts open connections; leaving it listens again."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self.mode = mode
        if mode == "down":
            self._close()
        elif self._server is None:
            self._listen()

    def stop(self) -> None:
        self.set_mode("down")

    def count(self, operation: str | None = None, mode: str | None = None,
              where: Callable[[Hit], bool] | None = None) -> int:
        """Requests seen, optionally only for ``operation``, answered in ``mode``, and matching ``where``."""
        with self._lock:
            hits = list(self.hits)
        return sum(1 for hit in hits if (operation is None or hit.operation == operation)
                   and (mode is None or hit.mode == mode) and (where is None or where(hit)))

    # ------------------------------------------------------------------------------ internals

    def _listen(self) -> None:
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        server = _Server(("127.0.0.1", self.port), handler)
        self._server = server
        threading.Thread(target=lambda: server.serve_forever(0.05), name=f"faulty-proxy-{self.port}",
                         daemon=True).start()

    def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:  # kept-alive client connections: cut them as a dead host would
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _track(self, connection: socket.socket, opened: bool) -> None:
        with self._lock:
            if opened:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _record(self, hit: Hit) -> str:
        with self._lock:
            self.hits.append(hit)
        return hit.mode

    def _forward(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            sent = {name: value for name, value in headers.items() if name.lower() not in _HOP_BY_HOP}
            connection.request(method, path, body=body, headers=sent)
            answer = connection.getresponse()
            payload = answer.read()
            kept = {name: value for name, value in answer.getheaders()
                    if name.lower() not in _HOP_BY_HOP and name.lower() not in ("server", "date")}
            return answer.status, kept, payload
        finally:
            connection.close()


@pytest.fixture
def faulty_proxy(moto_server: str) -> Iterator[Callable[..., FaultyProxy]]:
    """Factory: ``faulty_proxy(mode="pass", upstream=moto)`` starts a proxy; all are stopped after the test.

    ``upstream`` may be any plain-HTTP server (e.g. a callback receiver, to cut it off with "down").
    """
    started: list[FaultyProxy] = []

    def start(mode: str = "pass", upstream: str | None = None) -> FaultyProxy:
        proxy = FaultyProxy(upstream or moto_server).start(mode)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
