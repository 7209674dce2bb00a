"""The llm-engine task contract, as pure functions: what to POST, what to store, the error shape.

Requests arrive as llm-engine's ``EndpointPredictV1Request`` dict (``args``, ``url``, ``callback_url``,
``callback_auth``, ``return_pickled``...). Two result formats exist, as in llm-engine's forwarder configs:

- ``wrapped`` (``service--forwarder.yaml``): POST ``request["args"]`` (or the whole request when it has
  no ``args``); store ``{"result": "<model JSON as a string>", "status_code": <int>}``. A request may
  set ``serialize_results_as_string`` (top level, else inside ``args``) to store the JSON unencoded.
- ``raw`` (the "converted-from-artifact" config): POST the request as-is (less ``callback_auth``);
  store the model's JSON.

A non-2xx answer is not a failure: its status code travels in the stored result.
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import dataclass
from typing import Any

from forwarder.errors import MalformedRequest, ResultTooLarge

logger = logging.getLogger(__name__)

SERIALIZE_KEY = "serialize_results_as_string"
#: The setting that sets the result limit, named in the failure so an operator knows what to raise.
MAX_RESULT_VAR = "FORWARDER_MAX_RESULT_BYTES"
CALLBACK_AUTH_KEY = "callback_auth"


@dataclass(frozen=True)
class Plan:
    """What to send to the model for one request, and how to shape its answer."""

    body: Any
    serialize_as_string: bool
    result_format: str


def plan_request(request: Any, result_format: str) -> Plan:
    """Check a task's request and decide what to POST.

    As llm-engine's forwarder: the request must be an object; ``args`` is forwarded whatever JSON it
    is (object, array, string), except a number, boolean or null, on which llm-engine's forwarder fails
    before any HTTP call (its ``serialize_results_as_string`` lookup raises TypeError) unless the request
    already set that key at the top level, which skips the lookup.

    Raises:
        MalformedRequest: the request cannot be forwarded (before any HTTP call).
    """
    if not isinstance(request, dict):
        raise MalformedRequest(f"the request (first task argument) must be a JSON object, got {_kind(request)}")
    if result_format == "raw":
        # The model never needs the caller's callback credentials (llm-engine forwarded them).
        body = {key: value for key, value in request.items() if key != CALLBACK_AUTH_KEY}
        return Plan(body=body, serialize_as_string=False, result_format=result_format)
    body = request.get("args", request)
    serialize = _serialize_override(request)
    if serialize is None and isinstance(body, dict):
        serialize = _serialize_override(body)
    elif serialize is None and not isinstance(body, (list, str)):
        raise MalformedRequest(f"request 'args' must be a JSON object, array or string, got {_kind(body)}")
    return Plan(body=body, serialize_as_string=True if serialize is None else serialize, result_format=result_format)


def shape_result(model_json: Any, status_code: int, plan: Plan, *, max_bytes: int) -> Any:
    """The task result to store for the model's answer, if its JSON encoding fits ``max_bytes``.

    The size counted is the result's JSON encoding, which the result backend stores inside Celery's meta
    (a few hundred bytes more). It is encoded once more here and dropped at once: the store encodes the
    same result right after, so the peak is the store's own, and an oversized result never reaches the
    backend (Redis refuses a value over 512 MiB; short of that, each copy of a huge result is the
    worker's memory).

    Raises:
        ResultTooLarge: naming the size and the limit.
    """
    if plan.result_format == "raw":
        result = model_json
    else:
        result = {"result": json.dumps(model_json) if plan.serialize_as_string else model_json,
                  "status_code": status_code}
    size = len(json.dumps(result))  # ASCII (ensure_ascii, as Celery's JSON): characters are bytes
    if size > max_bytes:
        raise ResultTooLarge(
            f"the task's result is {size} bytes as JSON, more than {max_bytes} bytes (the limit, set by "
            f"{MAX_RESULT_VAR}); it was not stored"
        )
    return result


def format_trace(exc: BaseException) -> str:
    """The exception's traceback as text (the frames themselves are not kept)."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def error_payload(exc: BaseException, trace: str | None = None) -> dict[str, str]:
    """llm-engine's error shape: ``{"error": str(exc), "error_metadata": "Internal failure\\n<trace>"}``."""
    return {"error": str(exc), "error_metadata": f"Internal failure\n{trace or format_trace(exc)}"}


def _serialize_override(mapping: dict[str, Any]) -> bool | None:
    """The request's ``serialize_results_as_string``, read with Python truthiness as llm-engine does."""
    if SERIALIZE_KEY not in mapping:
        return None
    value = mapping[SERIALIZE_KEY]
    if not isinstance(value, bool):
        logger.warning("'%s' is %s, not true or false: read as %s (as llm-engine does)",
                       SERIALIZE_KEY, _kind(value), bool(value))
    return bool(value)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )
