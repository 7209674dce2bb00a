"""The ``logging`` post-inference hook: one Firehose record per finished task, as llm-engine writes it.

Record fields (llm-engine's ``LoggingHook``): ``EMITTED_AT`` (UTC, ``%Y-%m-%dT%H:%M:%S``),
``REQUEST_BODY`` (the request as a JSON *string*, like pydantic's ``request.json()``), ``RESPONSE_BODY``
(the stored result, or llm-engine's error payload for a failed task, with ``task_id``), ``ENDPOINT_ID``,
``ENDPOINT_NAME``, ``ENDPOINT_TYPE``, ``BUNDLE_ID`` and ``LABELS``.

Differences from llm-engine, on purpose:
- Credentials never reach the record: ``callback_auth`` and every key that looks like a password, token,
  secret, API key or authorization are replaced by ``[REDACTED]`` (request and response), and the values
  found under them are scrubbed from every other string of the record too.
- Empty labels (or identity) do not silently disable the hook: the record is written anyway.
- Failed tasks are logged too (llm-engine's hook never ran for them).
- A record over Firehose's 1,000 KiB limit is not dropped: ``REQUEST_BODY`` and ``RESPONSE_BODY`` are
  cut to fit, a ``TRUNCATED`` field gives their original sizes, and one warning is logged.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from gateways.cached_client import utcnow
from gateways.firehose import MAX_RECORD_BYTES, FirehoseGateway, encode_record

logger = logging.getLogger(__name__)

EMITTED_AT_FORMAT = "%Y-%m-%dT%H:%M:%S"
REDACTED = "[REDACTED]"
#: Marker field added to a truncated record: {"REQUEST_BODY": original bytes, "RESPONSE_BODY": ...}.
TRUNCATED_FIELD = "TRUNCATED"
#: Bytes kept free under Firehose's limit when truncating (the marker field and rounding).
_TRUNCATION_MARGIN = 1024
#: Secret values shorter than this are not scrubbed from free text (too likely to match innocently).
_MIN_SCRUBBED_SECRET = 6

# Keys are split into words (snake, kebab and camel case) and lower-cased. A key is a credential when:
# - one of its words is in _SECRET_WORDS ("callback_auth", "clientSecret", "Authorization", "password");
# - its last word is "token" ("access_token", "X-Auth-Token"), unless a tokenizer word qualifies it
#   ("eos_token", "stop_token", "max_token"): "max_new_tokens", "token_ids", "token_count" are kept;
# - its words run together contain _SECRET_JOINED ("api_key", "x-api-key", "privateKey").
_SECRET_WORDS = frozenset(
    {"password", "passwd", "pwd", "passphrase", "secret", "auth", "authorization", "credential", "credentials",
     "cookie"}
)
_SECRET_JOINED = ("apikey", "privatekey", "accesskey", "secretkey", "sessiontoken")
_TOKENIZER_WORDS = frozenset({"max", "min", "num", "stop", "eos", "bos", "pad", "unk", "sep", "cls", "mask"})
#: Inside a credential (e.g. ``callback_auth``), fields that describe it rather than prove it: not scrubbed
#: from free text (a username like "admin" or the kind "basic" would otherwise vanish from prompts).
_DESCRIPTIVE_KEYS = frozenset({"kind", "type", "username", "user", "user_id", "name"})
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a credential (``callback_auth``, ``api_key``, ``Authorization``...)."""
    words = [word.lower() for word in _WORD_SPLIT.split(key) if word]
    if not words:
        return False
    if _SECRET_WORDS.intersection(words):
        return True
    if words[-1] == "token" and not _TOKENIZER_WORDS.intersection(words):
        return True
    joined = "".join(words)
    return any(part in joined for part in _SECRET_JOINED)


def redact(value: Any, secrets: set[str] | None = None) -> Any:
    """A copy of ``value`` with every secret-looking key's value replaced by ``[REDACTED]``.

    The string values found under those keys are added to ``secrets`` (for scrubbing free text).
    """
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if isinstance(key, str) and is_secret_key(key):
                if secrets is not None:
                    _collect_strings(item, secrets)
                result[key] = REDACTED
            else:
                result[key] = redact(item, secrets)
        return result
    if isinstance(value, (list, tuple)):
        return [redact(item, secrets) for item in value]
    return value


def scrub(value: Any, secrets: set[str]) -> Any:
    """A copy of ``value`` where every occurrence of a secret inside a string is replaced by ``[REDACTED]``.

    Also catches secrets inside JSON text (a wrapped result is the model's JSON as a string), in its
    escaped forms.
    """
    needles = sorted(_variants(secrets), key=len, reverse=True)
    if not needles:
        return value
    pattern = re.compile("|".join(re.escape(needle) for needle in needles))

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return pattern.sub(REDACTED, item)
        if isinstance(item, Mapping):
            return {key: walk(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(inner) for inner in item]
        return item

    return walk(value)


def fit_record(record: dict[str, Any], limit: int = MAX_RECORD_BYTES) -> tuple[dict[str, Any], dict[str, int]]:
    """``record`` cut to fit ``limit`` encoded bytes: REQUEST_BODY and RESPONSE_BODY are shortened.

    Returns the record to put and ``{field: original encoded bytes}`` for each field cut (empty when the
    record fits as it is). A cut REQUEST_BODY is a prefix of its JSON string; a cut RESPONSE_BODY keeps
    ``task_id`` (and ``status_code``) and holds a prefix of its JSON under ``truncated``. Every other field
    is kept whole, so a record can still be too large when they alone are (the put then refuses it).
    """
    if len(encode_record(record)) <= limit:
        return record, {}
    request_text = record.get("REQUEST_BODY")
    request_text = request_text if isinstance(request_text, str) else json.dumps(request_text, default=str)
    response = record.get("RESPONSE_BODY")
    response_text = json.dumps(response, default=str)
    kept = {k: response[k] for k in ("task_id", "status_code") if isinstance(response, dict) and k in response}
    skeleton = {**record, "REQUEST_BODY": "", "RESPONSE_BODY": {**kept, "truncated": ""},
                TRUNCATED_FIELD: {"REQUEST_BODY": 10**9, "RESPONSE_BODY": 10**9}}
    budget = max(0, limit - len(encode_record(skeleton)) - _TRUNCATION_MARGIN)
    # Bytes each takes in the record as it is: REQUEST_BODY as a JSON string, RESPONSE_BODY as an object.
    sizes = {"REQUEST_BODY": _encoded_len(request_text), "RESPONSE_BODY": len(response_text.encode())}
    # Share the budget: a field smaller than its half keeps all of it, the other gets the rest.
    half = budget // 2
    request_budget = min(sizes["REQUEST_BODY"], max(half, budget - sizes["RESPONSE_BODY"]))
    response_budget = budget - request_budget
    cut: dict[str, int] = {}
    fitted = dict(record)
    if sizes["REQUEST_BODY"] > request_budget:
        fitted["REQUEST_BODY"] = _prefix(request_text, request_budget)
        cut["REQUEST_BODY"] = sizes["REQUEST_BODY"]
    if sizes["RESPONSE_BODY"] > response_budget:
        fitted["RESPONSE_BODY"] = {**kept, "truncated": _prefix(response_text, response_budget)}
        cut["RESPONSE_BODY"] = sizes["RESPONSE_BODY"]
    if not cut:
        return record, {}  # the other fields alone are too large: nothing to gain, the put refuses it
    fitted[TRUNCATED_FIELD] = cut
    return fitted, cut


class LoggingHook:
    """Write one llm-engine-shaped record per finished task to the Firehose stream."""

    name = "logging"

    def __init__(
        self,
        gateway: FirehoseGateway,
        *,
        endpoint_id: str,
        endpoint_name: str,
        endpoint_type: str,
        bundle_id: str,
        labels: Mapping[str, Any],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.gateway = gateway
        self.endpoint_id = endpoint_id
        self.endpoint_name = endpoint_name
        self.endpoint_type = endpoint_type
        self.bundle_id = bundle_id
        self.labels = dict(labels)
        self._clock = clock

    def __call__(
        self, request: Mapping[str, Any], response: dict[str, Any], task_id: str, state: str = "SUCCESS"
    ) -> None:
        """Build the record for ``task_id`` and put it; raises (for the HookRunner to log) if the put fails."""
        record = self.build_record(request, response)
        record, cut = fit_record(record)
        if cut:
            logger.warning(
                "logging hook: record for task %s exceeds Firehose's %d-byte limit; truncated %s (original bytes: %s)",
                task_id, MAX_RECORD_BYTES, ", ".join(cut), ", ".join(str(size) for size in cut.values()),
            )
        self.gateway.put_record(record)

    def build_record(self, request: Mapping[str, Any], response: dict[str, Any]) -> dict[str, Any]:
        """The record llm-engine writes, with credentials removed."""
        secrets: set[str] = set()
        safe_request = redact(request, secrets)
        safe_response = redact(response, secrets)
        record = {
            "EMITTED_AT": self._clock().strftime(EMITTED_AT_FORMAT),
            "REQUEST_BODY": json.dumps(safe_request, default=str),
            "RESPONSE_BODY": safe_response,
            "ENDPOINT_ID": self.endpoint_id,
            "ENDPOINT_NAME": self.endpoint_name,
            "ENDPOINT_TYPE": self.endpoint_type,
            "BUNDLE_ID": self.bundle_id,
            "LABELS": self.labels,
        }
        return scrub(record, secrets) if secrets else record


def _collect_strings(value: Any, found: set[str]) -> None:
    """The secret strings inside a credential's value (skipping descriptive fields like ``kind``)."""
    if isinstance(value, str):
        if len(value) >= _MIN_SCRUBBED_SECRET:
            found.add(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not (isinstance(key, str) and key.lower() in _DESCRIPTIVE_KEYS):
                _collect_strings(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_strings(item, found)


def _variants(secrets: set[str]) -> set[str]:
    """Each secret as it may appear in text: raw, JSON-escaped, and JSON-escaped twice."""
    found = set()
    for secret in secrets:
        once = json.dumps(secret)[1:-1]
        found.update({secret, once, json.dumps(once)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]})
    return {needle for needle in found if needle}


def _encoded_len(text: str) -> int:
    return len(json.dumps(text))


def _prefix(text: str, budget: int) -> str:
    """The longest prefix of ``text`` whose JSON encoding (quotes included) fits ``budget`` bytes."""
    cut = text[: max(0, budget)]
    while cut and _encoded_len(cut) > budget:
        over = _encoded_len(cut) - budget
        cut = cut[: len(cut) - max(1, over // 6)]
    return cut
