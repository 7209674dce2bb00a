"""The request TTL: a task that waited in the queue longer than FORWARDER_REQUEST_TTL is not sent to the model.

SageMaker async inference has ``RequestTTLSeconds`` for this; llm-engine's forwarder has no limit (unset here
too). The wait is measured from the producer's arrival timestamp, the task's second positional argument
(llm-engine: ``datetime.now()`` at the gateway), to the moment the check runs. ``expired_by`` is the one
check, pure: ``extensions.expiry`` runs it before each task starts, and a loop that holds a task (a model
outage) can run it again while it waits.

What the arrival timestamp may be:

- a ``datetime`` (kombu's JSON, 5.3 and later, turns the producer's datetime back into one);
- its ISO 8601 text (an older kombu, or a producer that sent a string);
- a number: seconds since the epoch (UTC).

**Timezones.** An aware timestamp means what it says. A naive one (llm-engine sends ``datetime.now()``,
which has no zone) is read as the worker's local time, which is what llm-engine's own stuck metric assumes
when it subtracts it from the worker's ``datetime.now()``: producer and worker must share a timezone. In
Kubernetes both run in UTC unless ``TZ`` is set, so this is UTC in practice. The conversion goes through the
zone's rules (``astimezone``), so a DST change between arrival and start costs nothing. A timestamp in the
future (the producer's clock runs ahead) counts as no wait: clock skew never expires a fresh request.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from forwarder.errors import ForwarderError


class RequestExpired(ForwarderError):
    """The request waited in the queue longer than FORWARDER_REQUEST_TTL: it was not sent to the model."""


def parse_ttl(raw: str) -> float | None:
    """FORWARDER_REQUEST_TTL: seconds > 0, or None when unset (no limit).

    Raises:
        ValueError: not a finite number > 0.
    """
    if raw.strip() == "":
        return None
    value = float(raw.strip())
    if not 0 < value < math.inf:
        raise ValueError("must be a number of seconds > 0 (unset: no limit)")
    return value


def parse_arrival(value: Any) -> datetime | None:
    """The producer's arrival timestamp as an aware UTC datetime; None when absent or unreadable.

    Accepts a datetime, its ISO 8601 text, or epoch seconds (int or float); a naive one is the worker's
    local time (see the module's docstring).
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):  # NaN, inf, out of range
            return None
    if not isinstance(value, datetime):
        return None
    try:
        return value.astimezone(UTC)  # naive: local time, by the zone's rules
    except (OverflowError, OSError, ValueError):  # year 1 or 9999 near the edge of what the zone can convert
        return None


def waited_seconds(arrival: datetime, now: datetime) -> float:
    """Seconds between ``arrival`` and ``now`` (both aware), never negative (a producer clock ahead: 0)."""
    return max(0.0, (now - arrival).total_seconds())


def expired_by(arrival: Any, now: datetime, ttl: float | None) -> str | None:
    """Why a request that arrived at ``arrival`` has expired at ``now``, or None when it may run.

    ``arrival`` is the task's raw second argument (see ``parse_arrival``); ``now`` an aware datetime (a naive
    one is read as local time too); ``ttl`` seconds, or None for no limit. An arrival that cannot be read
    never expires (the caller decides whether to warn: ``parse_arrival`` tells). Expired means waited
    strictly longer than ``ttl``.

    Returns:
        The RequestExpired message, "waited 21634 s in the queue, limit 21600 s", or None.
    """
    if ttl is None:
        return None
    arrived = parse_arrival(arrival)
    if arrived is None:
        return None
    waited = waited_seconds(arrived, now.astimezone(UTC))
    if waited <= ttl:
        return None
    limit = str(int(ttl)) if float(ttl).is_integer() else str(ttl)
    return f"waited {math.floor(waited)} s in the queue, limit {limit} s"
