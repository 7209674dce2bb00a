"""A real HTTP(S) callback receiver on 127.0.0.1 that records every request, and its fixture."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from devtools.servers import QuietHandler, serve_http, stop_http

__all__ = ["callback_receiver"]


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    client: tuple[str, int]

    @property
    def body(self) -> Any:
        return json.loads(self.raw or b"null")

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        value = self.headers.get("authorization", "")
        if not value.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(value[6:]).decode().partition(":")
        return user, password


class _Handler(QuietHandler):
    receiver: CallbackReceiver

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        receiver = self.receiver
        status, hang = receiver._record(
            Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, raw,
                     self.client_address[:2])
        )
        if hang:
            receiver._release.wait(120)
            self.close_connection = True
            return
        payload = b'{"ok": true}'
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", f"{receiver.url}/redirected")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class CallbackReceiver:
    """Records POSTs; answers ``statuses`` in order, then ``default_status``; ``hang``: never answers."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[Received] = []
        self.statuses: list[int] = []
        self.default_status = 200
        self.hang = False
        self.server_names: list[str | None] = []  # TLS SNI seen
        self._tls = tls
        self._cond = threading.Condition()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> CallbackReceiver:
        handler = type("Handler", (_Handler,), {"receiver": self})
        self._server = serve_http(handler, name="callback-receiver", prepare=self._wrap_tls)
        return self

    def _wrap_tls(self, server: ThreadingHTTPServer) -> None:
        if self._tls is not None:
            self._tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)  # type: ignore[assignment]
            server.socket = self._tls.wrap_socket(server.socket, server_side=True)

    def stop(self) -> None:
        self._release.set()
        stop_http(self._server)
        self._server = None

    def wait_for(self, count: int = 1, timeout: float = 20) -> list[Received]:
        """Block until ``count`` requests arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"callback receiver got {len(self.received)} of {count} requests in {timeout:g} s")
                self._cond.wait(left)
            return list(self.received)

    def _record(self, request: Received) -> tuple[int, bool]:
        with self._cond:
            self.received.append(request)
            self._cond.notify_all()
            status = self.statuses.pop(0) if self.statuses else self.default_status
            return status, self.hang


@pytest.fixture
def callback_receiver() -> Iterator[CallbackReceiver]:
    """A plain-HTTP callback receiver of this test's own, stopped after it."""
    receiver = CallbackReceiver().start()
    yield receiver
    receiver.stop()
