"""HTTP calls to the model server: one pooled keep-alive session per process, timeouts on every call."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from gateways.cached_client import CachedClient
from gateways.errors import GatewayError, release_exception

logger = logging.getLogger(__name__)

#: Seconds between readiness probes at start.
READY_POLL_INTERVAL = 1.0
#: Statuses a proxy in front of the model answers, with no body, while the model behind it is away.
PROXY_AWAY_STATUSES = frozenset({502, 503, 504})
#: Body characters quoted in the error for a non-JSON answer.
BODY_PREVIEW = 200
#: Bytes read from the model's answer at a time while it is counted against the limit.
READ_CHUNK = 64 * 1024
#: The setting that sets ``max_response_bytes``, named in the refusal so an operator knows what to raise.
MAX_RESPONSE_VAR = "FORWARDER_MAX_RESPONSE_BYTES"


class ModelServerError(GatewayError):
    """Root of the model server's failures."""


class ModelNotReady(ModelServerError):
    """The model server did not become ready within the start-up deadline."""


class ModelConnectionError(ModelServerError):
    """The model server could not be reached (refused, reset, connect timeout): the task is retried."""


class ModelUnavailable(ModelConnectionError):
    """A proxy in front of the model answered 502, 503 or 504 with no body: the model behind it is away."""


class ModelTimeout(ModelServerError):
    """The model server accepted the request but did not answer within the read timeout."""


class ModelResponseError(ModelServerError):
    """The model server answered with a body that is not JSON."""


class ModelResponseTooLarge(ModelServerError):
    """The model's answer is larger than the limit: refused unread past it, never retried."""


@dataclass(frozen=True)
class ModelAnswer:
    """The model's JSON answer, its HTTP status, its size in bytes and its ``Retry-After`` header, if any."""

    status_code: int
    body: Any
    size: int
    retry_after: str | None = None


def build_session(pool_size: int) -> requests.Session:
    """A keep-alive session holding at most ``pool_size`` connections, one per concurrent task.

    The pool blocks when full instead of opening more: the caller sizes it to the tasks that can call at
    once, so it never waits, and the model never sees more sockets from this process than tasks in flight.
    urllib3 retries nothing (``max_retries=0``): a failed connect is the caller's to judge
    (``forwarder.model_attempts``: one more try if the model still answers ready, else an outage hold),
    and urllib3's own retries logged a WARNING per attempt, twice a second while a model was away. Reads are
    never retried: the model may already be working on the request.
    """
    session = requests.Session()
    # The model is a sidecar on localhost: no proxy, no .netrc. With trust_env, requests reads both on every
    # call (it walks the environment and stats ~/.netrc per request: ~10 % of a worker's CPU at scale).
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0, pool_block=True)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class ModelClient:
    """Predict and readiness calls to the user's model server."""

    def __init__(
        self,
        predict_url: str,
        healthcheck_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        pool_size: int,
        max_response_bytes: int,
    ) -> None:
        self.predict_url = predict_url
        self.healthcheck_url = healthcheck_url
        self.max_response_bytes = max_response_bytes
        self._timeout = (connect_timeout, read_timeout)
        self._connect_timeout = connect_timeout
        self.session = CachedClient("model-http-session", lambda: (build_session(pool_size), None))

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> ModelAnswer:
        """POST ``payload`` as JSON and return the model's JSON answer with its status.

        The answer is streamed and counted: one over ``max_response_bytes`` is refused as soon as its
        ``Content-Length`` or the bytes read so far show it, and its connection is closed rather than
        drained, so no more than the limit is ever held.

        Raises:
            ModelConnectionError: the server could not be reached (the task retries).
            ModelUnavailable: a proxy answered 502/503/504 with no body (the model behind it is away).
            ModelTimeout: no answer within the read timeout.
            ModelResponseTooLarge: the answer is larger than ``max_response_bytes``.
            ModelResponseError: the answer is not JSON.
        """
        # Errors are raised after their except blocks, chained to nothing: a requests error holds the
        # prepared request (the whole encoded payload) and a JSON error the whole answer, and the task's
        # exception outlives the task in Celery's retry and failure bookkeeping.
        failure: ModelServerError | None = None
        try:
            response = self.session.get().post(
                self.predict_url, json=payload, headers=headers, timeout=self._timeout, stream=True
            )
            content = self._read_body(response)
        except (requests.ConnectionError, requests.Timeout) as exc:
            failure = self._transport_failure(exc)
            release_exception(exc)
        if failure is not None:
            raise failure
        if content is None:  # over the limit: nothing of the answer is held here
            raise ModelResponseTooLarge(
                f"model server answered HTTP {response.status_code} with more than {self.max_response_bytes} "
                f"bytes (the limit, set by {MAX_RESPONSE_VAR}); the answer was dropped"
            )
        size = len(content)
        if size == 0 and response.status_code in PROXY_AWAY_STATUSES:
            raise ModelUnavailable(f"model server {self.predict_url} answered HTTP {response.status_code} with no body")
        retry_after = response.headers.get("Retry-After")
        text = _decode(content, response.encoding)
        del content  # one copy of the answer at a time: the text, then the parsed JSON
        try:
            body = json.loads(text)
        except ValueError as exc:
            release_exception(exc)
            failure = ModelResponseError(
                f"model server answered HTTP {response.status_code} with a body that is not JSON: "
                f"{text[:BODY_PREVIEW]!r}"
            )
        if failure is not None:
            raise failure
        return ModelAnswer(response.status_code, body, size, retry_after)

    def _read_body(self, response: requests.Response) -> bytearray | None:
        """The whole body, or None (the response closed) once it is known to exceed the limit.

        A ``Content-Length`` over the limit is refused before any byte is read; otherwise (no header, or
        one that lies) the bytes are counted as they arrive. Closing instead of draining costs the pooled
        connection, which is rebuilt on the next call, rather than reading the rest of a runaway answer.
        """
        limit = self.max_response_bytes
        try:
            declared = int(response.headers.get("Content-Length", ""))
        except ValueError:  # absent (chunked) or not a number: counting decides
            declared = 0
        if declared > limit:
            response.close()
            return None
        content = bytearray()
        for chunk in response.iter_content(READ_CHUNK):
            content += chunk
            if len(content) > limit:
                del content  # not held by this frame should the close raise
                response.close()
                return None
        return content

    def _transport_failure(self, exc: requests.RequestException) -> ModelServerError:
        """Our error for a failed POST: connection problems are retried, a read timeout is not."""
        if isinstance(exc, requests.ConnectTimeout):
            return ModelConnectionError(f"model server {self.predict_url}: connect timed out")
        if isinstance(exc, requests.ReadTimeout):
            return ModelTimeout(f"model server {self.predict_url} did not answer within {self._timeout[1]:g} s")
        return ModelConnectionError(f"model server {self.predict_url} unreachable: {_root_cause(exc)}")

    def is_ready(self) -> tuple[bool, str]:
        """One readiness probe: (ready, what was seen)."""
        try:
            response = self.session.get().get(self.healthcheck_url, timeout=(self._connect_timeout, 5.0))
        except requests.RequestException as exc:
            seen = _root_cause(exc)
            release_exception(exc)
            return False, seen
        return response.status_code == 200, f"HTTP {response.status_code}"

    def wait_ready(self, timeout: float) -> None:
        """Block until the readiness URL answers 200.

        Logs one line when the wait starts, one each time what is seen changes (refused, then HTTP 503,
        ...), and one when the model is ready: never a line per probe.

        Raises:
            ModelNotReady: not ready within ``timeout`` seconds.
        """
        started = time.monotonic()
        deadline = started + timeout
        last_seen = ""
        while True:
            ready, seen = self.is_ready()
            if ready:
                if last_seen:
                    logger.info("model server ready at %s after %.1f s", self.healthcheck_url, time.monotonic() - started)
                else:
                    logger.info("model server ready at %s", self.healthcheck_url)
                return
            now = time.monotonic()
            if now >= deadline:
                raise ModelNotReady(
                    f"model server not ready at {self.healthcheck_url} after {timeout:g} s (last: {seen})"
                )
            if seen != last_seen:
                verb = "waiting for" if not last_seen else "still waiting for"
                logger.info("%s the model server at %s (%s; up to %g s)", verb, self.healthcheck_url, seen, timeout)
                last_seen = seen
            time.sleep(min(READY_POLL_INTERVAL, max(0.0, deadline - now)))

    def close(self) -> None:
        """Close the pooled connections of this process."""
        self.session.close()


def _decode(content: bytearray, encoding: str | None) -> str:
    """The answer as text, as requests' ``Response.json`` reads it: the declared charset, else JSON's own
    detection (UTF-8, -16 or -32); undecodable bytes are replaced."""
    try:
        return content.decode(encoding or json.detect_encoding(content), errors="replace")
    except LookupError:  # a charset Python does not know
        return content.decode("utf-8", errors="replace")


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, short enough for one log line."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    reason = getattr(exc, "reason", None)
    text = str(reason or exc)
    return f"{type(exc).__name__}: {text}"[:300]
