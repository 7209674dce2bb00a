"""A fake Datadog trace agent on 127.0.0.1: accepts ddtrace's v0.4 trace payloads and keeps every span.

Production runs ``ddtrace-run python -m forwarder`` with tracing on, its writer sending spans to the node's
agent. This stands in for that agent so a test can run the worker exactly so, with nothing leaving the
machine, and check what ddtrace reported. Workers using it must set ``DD_TRACE_API_VERSION=v0.4`` (plain
msgpack: a list of traces, each a list of span maps); v0.5's string-table format is refused with 415
rather than misread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import msgpack
import pytest

from devtools.servers import QuietHandler, serve_http, stop_http

__all__ = ["trace_agent"]

TRACES_PATH = "/v0.4/traces"


class _Handler(QuietHandler):
    agent: TraceAgent

    def do_PUT(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != TRACES_PATH:
            self._answer(415 if self.path.endswith("/traces") else 404, b"{}")
            return
        traces = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        self.agent._record([span for trace in traces for span in trace])
        self._answer(200, json.dumps({"rate_by_service": {}}).encode())

    do_POST = do_PUT

    def do_GET(self) -> None:  # /info: an agent that advertises nothing makes ddtrace keep its defaults
        self._answer(404, b"{}")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TraceAgent:
    """Collects the spans ddtrace sends; ``wait_for_spans`` blocks until a predicate over them holds."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Worker environment: tracing on, reporting to this agent only."""
        return {
            "DD_TRACE_ENABLED": "true",
            "DD_TRACE_AGENT_URL": self.url,
            "DD_TRACE_API_VERSION": "v0.4",
            "DD_SERVICE": "celery-forwarder-test",
            "DD_ENV": "test",
        }

    def start(self) -> TraceAgent:
        self._server = serve_http(type("Handler", (_Handler,), {"agent": self}), name="trace-agent")
        return self

    def stop(self) -> None:
        stop_http(self._server)
        self._server = None

    def wait_for_spans(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str
    ) -> list[dict[str, Any]]:
        """Block until ``done(spans)`` is true; return the spans. Raises TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({str(span.get("name")) for span in self.spans})
                    raise TimeoutError(f"trace agent: no {what} after {timeout:g} s ({len(self.spans)} spans: {names})")
                self._cond.wait(left)
            return list(self.spans)

    def _record(self, spans: list[dict[str, Any]]) -> None:
        with self._cond:
            self.spans.extend(spans)
            self._cond.notify_all()


@pytest.fixture
def trace_agent() -> Iterator[TraceAgent]:
    """A fake trace agent of this test's own, stopped after it."""
    agent = TraceAgent().start()
    yield agent
    agent.stop()
