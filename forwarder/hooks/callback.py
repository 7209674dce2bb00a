"""The ``callback`` post-inference hook: POST each finished task's response to the caller's URL.

As llm-engine's ``CallbackHook``: the URL is the request's ``callback_url``, else the endpoint default;
the body is the stored result with ``task_id``; the auth is the request's ``callback_auth``, else the
default. Kind ``basic`` sends HTTP basic (username, password); any other kind (``mtls``), or no auth at
all, is sent as llm-engine does, as basic (endpoint user id, "") — mTLS client certificates are not
supported, and a warning says so. A failed task gets a callback too (llm-engine sends none):
``{"task_id", "state": "FAILURE", "error"}``.

Unlike llm-engine: every attempt has a timeout, retries are bounded, the destination is checked
against SSRF (``gateways.callback``), and the password is never logged. With
FORWARDER_CALLBACK_SIGNING_SECRET set, every attempt is signed (Standard Webhooks, as Replicate does) with
the task id as ``webhook-id``, so a receiver can verify it and drop a repeat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from forwarder.errors import HookError
from gateways.callback import CallbackClient

logger = logging.getLogger(__name__)


class CallbackAuthError(HookError):
    """The request's ``callback_auth`` is not a valid llm-engine CallbackAuth (values never shown)."""


class CallbackHook:
    """Deliver the response to the request's (or the default) callback URL."""

    name = "callback"

    def __init__(
        self,
        client: CallbackClient,
        *,
        default_url: str = "",
        default_auth: tuple[str, str] | None = None,
        user_id: str = "",
    ) -> None:
        self.client = client
        self.default_url = default_url
        self.default_auth = default_auth
        #: Sent as basic (user_id, "") for auth kinds other than "basic", as llm-engine does.
        self.user_id = user_id

    def __call__(
        self, request: Mapping[str, Any], response: dict[str, Any], task_id: str, state: str = "SUCCESS"
    ) -> bool:
        """Send the outcome to the callback URL, if there is one; False when there is none (nothing sent).

        SUCCESS: the stored result with ``task_id`` (llm-engine's body). FAILURE (llm-engine sends none):
        ``{"task_id", "state": "FAILURE", "error"}``, the error text llm-engine's API shows for the task;
        never the stack trace, since the URL belongs to someone outside.

        Raises:
            CallbackAuthError: ``callback_auth`` is malformed.
            HookError: ``callback_url`` is not a string.
            CallbackRefused, CallbackError: the destination is refused, or delivery failed.
        """
        url = self._url(request)
        if not url:
            logger.debug("task %s: no callback URL in the request and no default; no callback", task_id)
            return False
        auth = self._auth(request)
        where = _host_of(url)
        body = response if state != "FAILURE" else failure_body(response, task_id)
        started = time.monotonic()
        self.client.send(url, body, auth, webhook_id=task_id)
        logger.info(
            "callback for task %s delivered to %s in %.2f s", task_id, where, time.monotonic() - started
        )
        return True

    # ------------------------------------------------------------------------------ internals

    def _url(self, request: Mapping[str, Any]) -> str:
        url = request.get("callback_url")
        if url is not None and not isinstance(url, str):
            raise HookError(f"callback_url must be a string, got {type(url).__name__}")
        return url or self.default_url

    def _auth(self, request: Mapping[str, Any]) -> tuple[str, str] | None:
        raw = request.get("callback_auth")
        if not raw:  # absent, null or {}: the default, as llm-engine's `request.callback_auth or default`,
            # and with no default llm-engine's (user_id, ""), which receivers may check.
            return self.default_auth or self._user_auth()
        if not isinstance(raw, Mapping):
            raise CallbackAuthError(f"callback_auth must be an object with a 'kind', got {type(raw).__name__}")
        kind = raw.get("kind")
        if not isinstance(kind, str) or not kind:
            raise CallbackAuthError("callback_auth needs a 'kind' string ('basic' or 'mtls')")
        if kind == "basic":
            username, password = raw.get("username"), raw.get("password")
            if not isinstance(username, str) or not isinstance(password, str):
                raise CallbackAuthError("callback_auth of kind 'basic' needs string 'username' and 'password'")
            return username, password
        logger.warning(
            "callback_auth kind %r is not supported (no mTLS client certificates); sending basic auth with the "
            "endpoint user and an empty password, as llm-engine does",
            kind[:32],
        )
        return self._user_auth()

    def _user_auth(self) -> tuple[str, str] | None:
        return (self.user_id, "") if self.user_id else None


def failure_body(response: Mapping[str, Any], task_id: str) -> dict[str, Any]:
    """The failure callback: task id, state and error text; no ``error_metadata`` (its stack trace)."""
    return {"task_id": task_id, "state": "FAILURE", "error": str(response.get("error", ""))}


def _host_of(url: str) -> str:
    """``host[:port]`` of a URL for logs: never its path, query or credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "?"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host
