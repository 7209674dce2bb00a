"""Callback signatures in the Standard Webhooks scheme (standardwebhooks.com), as Replicate signs its webhooks.

Each signed request carries three headers:

- ``webhook-id``: the message id, the same on every attempt to deliver one message (a receiver dedupes on it);
- ``webhook-timestamp``: whole seconds since the epoch, taken again for every attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, one per secret,
  space-separated, so a receiver holding either the old or the new secret verifies during a rotation.

A secret is ``whsec_`` followed by the base64 of the key; the HMAC key is the decoded bytes. The body signed
is the exact bytes sent. This is the spec's signing side in a few lines (verified in the tests with the
``standardwebhooks`` package's own ``Webhook.verify``), so the worker needs no package for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence

#: The prefix the spec gives a secret's text.
SECRET_PREFIX = "whsec_"
#: The spec's lower bound for a key (24 bytes, 192 bits): anything shorter is refused at start.
MIN_KEY_BYTES = 24
#: A message id that is safe in a header and unambiguous in "<id>.<timestamp>.<body>" (the spec's ids are
#: of this form; Celery's task ids are UUIDs).
_ID = re.compile(r"[A-Za-z0-9_\-:]{1,256}")


def parse_secrets(raw: str) -> tuple[bytes, ...]:
    """The HMAC keys of the space-separated ``whsec_`` secrets in ``raw`` (empty: none).

    Raises:
        ValueError: a secret lacks the prefix, is not base64, or its key is shorter than MIN_KEY_BYTES.
            The message names the secret by position, never by value.
    """
    texts = raw.split()
    keys = []
    for number, text in enumerate(texts, 1):
        which = f"secret {number} of {len(texts)}" if len(texts) > 1 else "the secret"
        if not text.startswith(SECRET_PREFIX):
            raise ValueError(f"{which} must be {SECRET_PREFIX} followed by base64 (Standard Webhooks)")
        encoded = text[len(SECRET_PREFIX):]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{which} is not valid base64 after {SECRET_PREFIX}") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"{which} decodes to {len(key)} bytes; at least {MIN_KEY_BYTES} are required")
        keys.append(key)
    return tuple(keys)


def normalize_secrets(raw: str) -> str:
    """``raw`` validated (``parse_secrets``) and with its separators reduced to single spaces ("" when unset).

    Raises:
        ValueError: as ``parse_secrets``.
    """
    parse_secrets(raw)
    return " ".join(raw.split())


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64 HMAC-SHA256>`` signature of ``body`` for ``msg_id`` at ``timestamp`` (seconds)."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class WebhookSigner:
    """Signs each callback attempt with every configured key."""

    def __init__(self, keys: Sequence[bytes], clock: Callable[[], float] = time.time) -> None:
        if not keys:
            raise ValueError("a signer needs at least one key")
        self._keys = tuple(keys)
        self._clock = clock

    def __repr__(self) -> str:  # never the keys
        return f"WebhookSigner({len(self._keys)} key(s))"

    @staticmethod
    def valid_id(msg_id: str) -> bool:
        """Whether ``msg_id`` can be sent as ``webhook-id`` (letters, digits, ``_-:``; at most 256)."""
        return bool(_ID.fullmatch(msg_id))

    def headers(self, msg_id: str, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers for one attempt to send ``body``, timestamped now.

        Raises:
            ValueError: ``msg_id`` is not a valid id (``valid_id``).
        """
        if not self.valid_id(msg_id):
            raise ValueError("the webhook id must be 1-256 letters, digits, '_', '-' or ':'")
        timestamp = int(self._clock())
        signatures = " ".join(sign(key, msg_id, timestamp, body) for key in self._keys)
        return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures}
