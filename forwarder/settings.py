"""Every environment variable the worker reads: name, default, parser and meaning, in one table.

``VARS`` is the only place a default is written: the ``Settings`` fields have none, and ``--help`` and
the README's table are rendered from it. ``Settings.from_env(mapping, endpoint_config)`` is pure: it
reads only what it is given, validates every value and raises ``ConfigError`` naming the first bad
variable. ``load_settings`` adds the one read of a file (llm-engine's endpoint config). Nothing else in
the worker reads the environment (except the pool bootstrap, which must run before any import).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from forwarder.endpoint_config import read_endpoint_config
from forwarder.errors import ConfigError, is_secret_variable
from forwarder.health import (
    DEFAULT_HEALTH_DIR,
    DEFAULT_LIVENESS_MAX_AGE,
    HEALTH_DIR_ENV,
    LIVENESS_MAX_AGE_ENV,
    parse_health_dir,
    parse_max_age,
)
from forwarder.pool_bootstrap import DEFAULT_POOL, POOL_ENV, POOLS
from forwarder.pools import PoolSizes, pool_sizes
from forwarder.request_ttl import parse_ttl
from forwarder.urls import MASK, broker_url, optional_url, result_backend_url, safe_url, url
from gateways.dogstatsd import parse_url as parse_dogstatsd_url
from gateways.webhook_signing import normalize_secrets

RESULT_FORMATS = ("wrapped", "raw")
LOG_FORMATS = ("text", "json")
HOOK_NAMES = ("callback", "logging")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
MIB = 1024 * 1024
#: Redis's largest value (``proto-max-bulk-len``, 512 MiB by default; Celery's Redis backend refuses a
#: larger meta itself), and room for Celery's meta around a result.
REDIS_MAX_VALUE = 512 * MIB
_META_ROOM = 64 * 1024


# ---------------------------------------------------------------------------------------- parsers
# Each parser takes the raw string and returns the typed value or raises ValueError(reason).


def _positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 0:
        raise ValueError("must be an integer >= 0")
    return value


def _optional_positive_int(raw: str) -> int | None:
    return None if raw.strip() == "" else _positive_int(raw)


def _non_negative_float(raw: str) -> float:
    value = float(raw.strip())
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return value


def _positive_float(raw: str) -> float:
    value = _non_negative_float(raw)
    if value == 0:
        raise ValueError("must be > 0")
    return value


def _bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"must be one of {', '.join(_TRUE)} or {', '.join(w for w in _FALSE if w)}")


def _choice(*allowed: str) -> Callable[[str], str]:
    """One of ``allowed``, in any case and with spaces around; the value is the allowed spelling."""
    by_key = {word.casefold(): word for word in allowed}

    def parse(raw: str) -> str:
        try:
            return by_key[raw.strip().casefold()]
        except KeyError:
            raise ValueError(f"must be one of {', '.join(allowed)}") from None

    return parse


def _text(raw: str) -> str:
    return raw.strip()


def _queue(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


# URLs: forwarder.urls (parsed in full, with kombu's and Celery's own parsers for the broker and the results).
_url, _optional_url = url, optional_url


def hook_names(raw: str) -> tuple[str, ...]:
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = sorted(set(names) - set(HOOK_NAMES))
    if unknown:
        raise ValueError(f"unknown hook {', '.join(unknown)}: expected callback and/or logging")
    return tuple(dict.fromkeys(names))  # keep order, drop duplicates


def _json_object(raw: str) -> dict[str, Any]:
    if raw.strip() == "":
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return value


def _port(raw: str) -> int:
    return _bounded_int(raw, 1, 65535)


def _optional_dogstatsd_url(raw: str) -> str:
    value = raw.strip()
    if value:
        parse_dogstatsd_url(value)
    return value


def _statuses(raw: str) -> tuple[int, ...]:
    found = []
    for item in _csv(raw):
        status = int(item)
        if not 100 <= status <= 599:
            raise ValueError(f"{status} is not an HTTP status (100-599)")
        found.append(status)
    return tuple(dict.fromkeys(found))


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


# ------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, default (as the raw string), parser and meaning."""

    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    attr: str = ""


VARS: tuple[Var, ...] = (
    # --- pool and Celery worker
    Var(POOL_ENV, DEFAULT_POOL, _choice(*POOLS), "Worker pool: prefork (processes) or gevent (greenlets in one process).", "pool"),
    Var("CELERY_BROKER_URL", "redis://localhost:6379/0", broker_url, "Broker: redis://host:port/db or sqs://.", "broker_url"),
    Var("CELERY_RESULT_BACKEND", "redis://localhost:6379/1", result_backend_url, "Result backend: redis://host:port/db or s3://bucket/prefix.", "result_backend"),
    Var("CELERY_QUEUE", "celery", _queue, "The one queue this worker consumes (llm-engine: the endpoint's queue).", "queue"),
    Var("CELERY_WORKER_CONCURRENCY", "4", _positive_int, "Tasks run at once: prefork children, or gevent greenlets.", "concurrency"),
    Var("CELERY_WORKER_PREFETCH_MULTIPLIER", "", _optional_positive_int, "Unacknowledged messages per slot. Unset: 1 for prefork; 2 for gevent, whose consumer then holds at most one message beyond its running tasks and never sleeps while a slot is free.", "prefetch_multiplier"),
    Var("CELERY_WORKER_MAX_TASKS_PER_CHILD", "", _optional_positive_int, "prefork: replace a child after this many tasks (unset: never). Ignored with a warning under gevent.", "max_tasks_per_child"),
    Var("CELERY_WORKER_MAX_MEMORY_PER_CHILD", "", _optional_positive_int, "prefork: replace a child whose resident memory exceeds this many KiB after a task (unset: never). Ignored with a warning under gevent.", "max_memory_per_child"),
    Var("CELERY_BROKER_VISIBILITY_TIMEOUT", "3600", _positive_float, "Seconds before an unacknowledged message (its worker died) is delivered again (Redis broker; SQS uses the queue's own VisibilityTimeout). Must exceed the longest task, or a running task is delivered twice.", "visibility_timeout"),
    Var("CELERY_SQS_QUEUE_URL", "", _optional_url("http", "https"), "SQS broker: the queue's URL, predefined so no ListQueues/CreateQueue is needed.", "sqs_queue_url"),
    Var("CELERY_SQS_WAIT_TIME_SECONDS", "0", lambda raw: _bounded_int(raw, 0, 20), "SQS broker: ReceiveMessage long-poll seconds (0-20, SQS's own limit). 0 (short polling) avoids a message held by the poll of a worker that is exiting.", "sqs_wait_time_seconds"),
    Var("CELERY_SQS_POLLING_INTERVAL", "1", _non_negative_float, "SQS broker: seconds between polls of an empty queue.", "sqs_polling_interval"),
    Var("AWS_REGION", "", _text, "AWS region of the SQS broker and the S3 result bucket (unset: boto3's own chain, AWS_DEFAULT_REGION or the profile's region; boto3 itself ignores AWS_REGION). An AWS SQS queue URL's own region wins for the queue.", "aws_region"),
    Var("CELERY_LOG_LEVEL", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "Log level of the worker.", "log_level"),
    Var("FORWARDER_STRICT_ENV", "0", _bool, "1: a set variable under this worker's prefixes (FORWARDER_, FIREHOSE_, and a CELERY_ name close to one it reads) that it does not know stops it (exit 2) instead of one warning naming the closest known variable.", "strict_env"),
    Var("FORWARDER_LOG_FORMAT", "text", _choice(*LOG_FORMATS), "Log format: text (one readable line per record, for local runs) or json (one JSON object per line, with dd.trace_id/dd.span_id under ddtrace-run: the production choice).", "log_format"),
    # --- the model server
    Var("FORWARDER_MODEL_URL", "http://localhost:5005/predict", _url("http", "https"), "Where each task's payload is POSTed.", "model_url"),
    Var("FORWARDER_HEALTHCHECK_URL", "http://localhost:5005/readyz", _url("http", "https"), "Model readiness URL; the worker starts consuming once it answers 200.", "healthcheck_url"),
    Var("FORWARDER_MODEL_CONNECT_TIMEOUT", "5", _positive_float, "Seconds to connect to the model server.", "model_connect_timeout"),
    Var("FORWARDER_MODEL_READ_TIMEOUT", "600", _positive_float, "Seconds to wait for the model's answer before the task fails.", "model_read_timeout"),
    Var("FORWARDER_READY_TIMEOUT", "600", _non_negative_float, "Seconds to wait at start for the model's readiness before giving up (0: do not wait).", "ready_timeout"),
    Var("FORWARDER_MAX_RESPONSE_BYTES", str(64 * MIB), _positive_int, "Largest model answer read, in bytes (default 64 MiB). A larger one is refused by its Content-Length before its body is read, or cut off as soon as the bytes counted pass the limit (its connection closed, not drained); that task fails with ModelResponseTooLarge, never retried.", "max_response_bytes"),
    Var("FORWARDER_MAX_RESULT_BYTES", str(128 * MIB), _positive_int, "Largest task result stored, in bytes of its JSON encoding (default 128 MiB: twice the default answer limit, since the wrapped format re-encodes the answer as a string and escaping grows it). A larger one fails that task with ResultTooLarge before the store. Redis holds at most 512 MiB in one value; S3, 5 GB.", "max_result_bytes"),
    Var("FORWARDER_RESULT_FORMAT", "wrapped", _choice(*RESULT_FORMATS), 'wrapped: {"result": "<model JSON as a string>", "status_code": N} (llm-engine default); raw: the model JSON, payload forwarded whole.', "result_format"),
    Var("FORWARDER_REQUEST_TTL", "", parse_ttl, "Seconds a request may wait in the queue, from its producer's arrival timestamp to its start (SageMaker async: RequestTTLSeconds). An older one is not sent to the model: stored as a FAILURE (RequestExpired), hooks run. A timestamp without a zone (llm-engine's datetime.now()) is read as the worker's local time, UTC in Kubernetes: producer and worker must share a timezone. Unset: no limit, as llm-engine.", "request_ttl"),
    Var("FORWARDER_MAX_DELIVERIES", "3", _non_negative_int, "Deliveries of one task whose worker died (OOM kill, crash) before the next is refused: stored as a FAILURE, hooks run, acked (0: never refuse). Redis broker: counted in the broker's Redis; SQS: ApproximateReceiveCount.", "max_deliveries"),
    Var("FORWARDER_MODEL_OUTAGE_MAX", "900", _positive_float, "Seconds a task taken waits in place for a model server that went away (refused, reset, connect timeout or a proxy's empty 502/503/504, and its readiness failing too) before it is handed back to the queue, unrun. Intake stops while the model is away; a warm shutdown hands waiting tasks back at once. Must be below CELERY_BROKER_VISIBILITY_TIMEOUT (Redis); unset, half that timeout when it is shorter than 1800 s.", "model_outage_max"),
    Var("FORWARDER_RETRY_STATUSES", "", _statuses, "Comma-separated HTTP statuses of the model's answer that are sent again in place (e.g. 429,503), after the answer's Retry-After (at most FORWARDER_RETRY_BACKOFF_MAX) or the backoff, up to FORWARDER_RETRY_MAX times; the last answer is stored. Empty: every status is stored as the result, as llm-engine does.", "retry_statuses"),
    Var("FORWARDER_RETRY_MAX", "5", _non_negative_int, "Retries of a task whose model connection failed while its readiness still passed (an outage is held instead: FORWARDER_MODEL_OUTAGE_MAX), and resends of a FORWARDER_RETRY_STATUSES answer.", "retry_max"),
    Var("FORWARDER_RETRY_BACKOFF", "2", _positive_int, "Whole seconds before the first retry; doubles each retry, with full jitter.", "retry_backoff"),
    Var("FORWARDER_RETRY_BACKOFF_MAX", "60", _positive_int, "Longest wait between retries, in whole seconds.", "retry_backoff_max"),
    # --- Kubernetes probes (python -m forwarder probe live|ready reads these two itself: forwarder.health)
    Var(HEALTH_DIR_ENV, DEFAULT_HEALTH_DIR, parse_health_dir, "Absolute folder of the health files the worker writes and `python -m forwarder probe live|ready` reads (created at start; one worker per folder).", "health_dir"),
    Var(LIVENESS_MAX_AGE_ENV, DEFAULT_LIVENESS_MAX_AGE, parse_max_age, "Seconds (>= 1) without a heartbeat from the consumer's loop after which `probe live` fails; the loop beats every quarter of it (at most every 10 s).", "liveness_max_age"),
    # --- post-inference hooks
    Var("FORWARDER_HOOKS", "", hook_names, "Comma-separated post-inference hooks: callback, logging (empty: none).", "hooks"),
    Var("FORWARDER_ENDPOINT_CONFIG_PATH", "", _text, "Optional llm-engine endpoint-config file (base64 JSON); its hooks and identity are used where the FORWARDER_ variables are unset.", "endpoint_config_path"),
    Var("FORWARDER_ENDPOINT_ID", "", _text, "Endpoint id, for the logging hook's record.", "endpoint_id"),
    Var("FORWARDER_ENDPOINT_NAME", "", _text, "Endpoint name, for the logging hook's record.", "endpoint_name"),
    Var("FORWARDER_ENDPOINT_USER_ID", "", _text, "Endpoint owner's user id: a callback whose request names no auth is sent with HTTP basic (user_id, \"\"), as llm-engine does (unset: the endpoint config's user_id).", "endpoint_user_id"),
    Var("FORWARDER_ENDPOINT_TYPE", "async", _text, "Endpoint type, for the logging hook's record.", "endpoint_type"),
    Var("FORWARDER_BUNDLE_ID", "", _text, "Model bundle id, for the logging hook's record.", "bundle_id"),
    Var("FORWARDER_LABELS", "", _json_object, "Endpoint labels as a JSON object, for the logging hook's record.", "labels"),
    Var("FORWARDER_CALLBACK_URL", "", _optional_url("http", "https"), "Default callback URL when a request names none.", "callback_url"),
    Var("FORWARDER_CALLBACK_AUTH_USERNAME", "", _text, "Default callback basic-auth user.", "callback_username"),
    Var("FORWARDER_CALLBACK_AUTH_PASSWORD", "", _text, "Default callback basic-auth password (never logged).", "callback_password"),
    Var("FORWARDER_CALLBACK_ALLOWED_HOSTS", "", _csv, "Callback allow-list: host names, IPs or CIDRs (comma-separated). Unset: any public address; loopback, link-local, private and metadata addresses are refused.", "callback_allowed_hosts"),
    Var("FORWARDER_CALLBACK_TIMEOUT", "10", _positive_float, "Seconds for one callback attempt (connect and read).", "callback_timeout"),
    Var("FORWARDER_CALLBACK_RETRIES", "3", _positive_int, "Callback attempts in all (on connection errors and 5xx), with exponential backoff.", "callback_attempts"),
    Var("FORWARDER_CALLBACK_SIGNING_SECRET", "", normalize_secrets, "Sign every callback in the Standard Webhooks scheme (as Replicate does): whsec_ followed by the base64 of a key of at least 24 bytes; several, space-separated, during a rotation (one signature each). Adds webhook-id (the task id), webhook-timestamp and webhook-signature. Unset: callbacks unsigned, as llm-engine sends them. Never shown.", "callback_signing_secret"),
    Var("FIREHOSE_STREAM_NAME", "", _text, "Firehose delivery stream of the logging hook.", "firehose_stream_name"),
    Var("FIREHOSE_ROLE_ARN", "", _text, "Role assumed (STS) for Firehose; unset: the default credential chain.", "firehose_role_arn"),
    Var("FIREHOSE_SESSION_DURATION", "3600", lambda raw: _bounded_int(raw, 900, 43200), "Assume-role session length in seconds (900-43200); an hour avoids botocore's 15-minute refresh on every call.", "firehose_session_duration"),
    Var("FIREHOSE_REFRESH_LEEWAY", "600", _non_negative_float, "Rebuild the Firehose client this many seconds before its credentials expire.", "firehose_refresh_leeway"),
    Var("FIREHOSE_CLIENT_MAX_POOL_CONNECTIONS", "", _optional_positive_int, "Connection pool of the Firehose client (unset: the tasks one process runs at once, plus a margin, at least 10).", "firehose_max_pool_connections"),
    # --- metrics (DogStatsD)
    Var("FORWARDER_SUMMARY_INTERVAL", "60", _non_negative_float, "Seconds between the summary lines in the log: tasks done, failed and retried over the interval, in flight now, and the model's p50/p99 latency (0: no summary line).", "summary_interval"),
    Var("FORWARDER_METRICS", "1", _bool, "Send DogStatsD metrics to the local Datadog agent (0: none). Sending never blocks a task: a packet nobody takes is dropped.", "metrics"),
    Var("FORWARDER_STUCK_AFTER", "86400", _positive_float, "Seconds after its arrival (the producer's timestamp) at which a task that starts counts as stuck (scale_launch.async_task.stuck.count; llm-engine: a day).", "stuck_after"),
    Var("DD_AGENT_HOST", "localhost", lambda raw: raw.strip() or "localhost", "Host of the Datadog agent's DogStatsD (the node's IP in Kubernetes).", "dd_agent_host"),
    Var("DD_DOGSTATSD_PORT", "8125", _port, "UDP port of the agent's DogStatsD.", "dd_dogstatsd_port"),
    Var("DD_DOGSTATSD_URL", "", _optional_dogstatsd_url, "DogStatsD address as a URL, winning over host and port: udp://host:port or unix:///path/to/dsd.socket.", "dd_dogstatsd_url"),
    # --- memory diagnostics
    Var("FORWARDER_MEMORY_DEBUG", "0", _bool, "1: trace allocations and log a memory dump per process every interval and on SIGUSR2.", "memory_debug"),
    Var("FORWARDER_MEMORY_DEBUG_INTERVAL", "300", _positive_float, "Seconds between memory dumps.", "memory_debug_interval"),
    Var("FORWARDER_MEMORY_DEBUG_TOP", "15", _positive_int, "Allocation sites listed in each dump.", "memory_debug_top"),
)


#: The variable naming llm-engine's endpoint-config file (read by ``load_settings``).
ENDPOINT_CONFIG_VAR = next(var for var in VARS if var.name == "FORWARDER_ENDPOINT_CONFIG_PATH")


def _bounded_int(raw: str, low: int, high: int) -> int:
    value = int(raw.strip())
    if not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}")
    return value


@dataclass(frozen=True)
class Settings:
    """The validated configuration. Build it with ``Settings.from_env``; fields follow ``VARS``."""

    pool: str
    broker_url: str
    result_backend: str
    queue: str
    concurrency: int
    prefetch_multiplier: int | None
    max_tasks_per_child: int | None
    max_memory_per_child: int | None
    visibility_timeout: float
    sqs_queue_url: str
    sqs_wait_time_seconds: int
    sqs_polling_interval: float
    log_level: str
    strict_env: bool
    log_format: str
    model_url: str
    healthcheck_url: str
    model_connect_timeout: float
    model_read_timeout: float
    ready_timeout: float
    max_response_bytes: int
    max_result_bytes: int
    result_format: str
    request_ttl: float | None
    max_deliveries: int
    model_outage_max: float
    retry_statuses: tuple[int, ...]
    retry_max: int
    retry_backoff: int
    retry_backoff_max: int
    health_dir: str
    liveness_max_age: float
    hooks: tuple[str, ...]
    endpoint_config_path: str
    endpoint_id: str
    endpoint_name: str
    endpoint_user_id: str
    endpoint_type: str
    bundle_id: str
    labels: dict[str, Any]
    callback_url: str
    callback_username: str
    callback_password: str = field(repr=False)
    callback_allowed_hosts: tuple[str, ...]
    callback_timeout: float
    callback_attempts: int
    callback_signing_secret: str = field(repr=False)
    firehose_stream_name: str
    firehose_role_arn: str
    firehose_session_duration: int
    firehose_refresh_leeway: float
    firehose_max_pool_connections: int | None
    aws_region: str
    summary_interval: float
    metrics: bool
    stuck_after: float
    dd_agent_host: str
    dd_dogstatsd_port: int
    dd_dogstatsd_url: str
    memory_debug: bool
    memory_debug_interval: float
    memory_debug_top: int
    #: Warnings found while validating (settings that are valid but have no effect).
    warnings: tuple[str, ...]

    @classmethod
    def from_env(cls, environ: Mapping[str, str], endpoint_config: Mapping[str, Any] | None = None) -> Settings:
        """Parse and validate every variable in ``VARS`` from ``environ``; pure.

        ``endpoint_config`` is llm-engine's endpoint-config object (see ``load_settings``): it fills the
        hook settings that ``environ`` leaves unset.

        Raises:
            ConfigError: naming the first invalid variable and why.
        """
        values = {var.attr: parse_var(var, environ) for var in VARS}
        unknown = unknown_variables(environ)
        if unknown and values["strict_env"]:
            name, hint = unknown[0]
            raise ConfigError(name, None, f"is not a variable this worker reads{hint} (FORWARDER_STRICT_ENV=1)")
        skipped: list[str] = [f"{name} is not a variable this worker reads{hint}; ignored" for name, hint in unknown]
        if endpoint_config is not None:
            values, from_config = apply_endpoint_config(values, endpoint_config, values["endpoint_config_path"])
            skipped += from_config
        if OUTAGE_MAX_VAR not in environ:
            values["model_outage_max"] = default_outage_max(values)
        _check_combinations(values)
        values["warnings"] = tuple(skipped) + _warnings(values)
        return cls(**values)

    @property
    def pools(self) -> PoolSizes:
        """The size of every connection pool, from the pool kind and the concurrency (``forwarder.pools``)."""
        return pool_sizes(self.pool, self.concurrency)

    @property
    def firehose_pool_size(self) -> int:
        """Connections in the Firehose client's pool: explicit, or enough for the process's tasks."""
        return self.firehose_max_pool_connections or self.pools.per_process_clients

    @property
    def effective_prefetch_multiplier(self) -> int:
        """The prefetch multiplier in force.

        gevent runs Celery's synchronous consumer loop: with a window of exactly one message per slot
        it finds the window full, registers no BRPOP and sleeps in ``drain_events(timeout=2.0)`` even
        after slots free up (measured: 2 tasks/s instead of 60 at concurrency 4). With two per slot the
        consumer instead blocks in the gevent pool's ``spawn()`` holding one message, and resumes the
        moment a slot frees. prefork's event loop wakes on every ack, so one per slot is enough.
        """
        if self.prefetch_multiplier is not None:
            return self.prefetch_multiplier
        return 2 if self.pool == "gevent" else 1

    @property
    def broker_is_sqs(self) -> bool:
        return self.broker_url.startswith("sqs://")

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (for tests and the demo)."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(changes)
        return Settings(**current)


def parse_var(var: Var, environ: Mapping[str, str]) -> Any:
    """One variable's typed value from ``environ`` (its default when unset).

    Raises:
        ConfigError: the value is invalid.
    """
    raw = environ.get(var.name, var.default)
    try:
        return var.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(var.name, safe_url(raw) if "://" in raw else raw, _reason(exc)) from None


#: Prefixes of this worker's own variables: any set name under them that it does not read is a mistake.
OWN_PREFIXES = ("FORWARDER_", "FIREHOSE_")
#: CELERY_ names that Celery itself or llm-engine's chart set or read (its chart sets CELERY_TASK_VISIBILITY,
#: which neither forwarder reads); another CELERY_ name counts as a typo when it is close to one of ours.
OTHER_CELERY_NAMES = frozenset({
    "CELERY_RDBSIG", "CELERY_RDB_HOST", "CELERY_RDB_PORT", "CELERY_LOADER", "CELERY_CONFIG_MODULE",
    "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL", "CELERY_BENCH", "CELERY_BENCH_EVERY", "CELERY_TRACE_APP",
    "CELERY_LOG_FILE", "CELERY_LOG_REDIRECT", "CELERY_LOG_REDIRECT_LEVEL", "CELERY_CUSTOM_WORKER_POOL",
    "CELERY_SKIP_CHECKS", "CELERY_TASK_VISIBILITY",
})
#: How close (difflib's ratio) a CELERY_ name must be to one of ours to count as its typo.
CELERY_TYPO_RATIO = 0.8


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Set variables under this worker's prefixes that it does not read, sorted, each with a hint naming the
    closest variable it does read (difflib), or ``""``; pure."""
    known = [var.name for var in VARS]
    found = []
    for name in sorted(environ):
        if name in known or name in OTHER_CELERY_NAMES:
            continue
        if name.startswith(OWN_PREFIXES):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        elif name.startswith("CELERY_"):
            close = difflib.get_close_matches(name, known, n=1, cutoff=CELERY_TYPO_RATIO)
            if not close:
                continue
        else:
            continue
        found.append((name, f" (did you mean {close[0]}?)" if close else ""))
    return found


def load_settings(environ: Mapping[str, str]) -> Settings:
    """The worker's settings: ``environ`` plus the endpoint-config file it names, if any.

    Raises:
        ConfigError: an invalid variable, or an endpoint-config file that cannot be read or parsed.
    """
    path = parse_var(ENDPOINT_CONFIG_VAR, environ)
    return Settings.from_env(environ, read_endpoint_config(path) if path else None)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"is not valid JSON ({exc.msg})"
    if text.startswith("invalid literal for int()"):
        return "is not an integer"
    if text.startswith("invalid literal") or text.startswith("could not convert"):
        return "is not a number"
    return text


OUTAGE_MAX_VAR = "FORWARDER_MODEL_OUTAGE_MAX"


def default_outage_max(values: dict[str, Any]) -> float:
    """FORWARDER_MODEL_OUTAGE_MAX when unset: 900 s, or half a shorter Redis visibility timeout (a held task is
    unacknowledged, and must be handed back well before the broker would deliver it again)."""
    if values["broker_url"].startswith("sqs://"):
        return values["model_outage_max"]
    return min(values["model_outage_max"], values["visibility_timeout"] / 2)


def _check_combinations(values: dict[str, Any]) -> None:
    if values["broker_url"].startswith("sqs://") and not values["sqs_queue_url"]:
        raise ConfigError("CELERY_SQS_QUEUE_URL", "", "is required when CELERY_BROKER_URL is sqs://")
    if "logging" in values["hooks"] and not values["firehose_stream_name"]:
        raise ConfigError("FIREHOSE_STREAM_NAME", "", "is required when FORWARDER_HOOKS includes logging")
    if not values["broker_url"].startswith("sqs://") and values["model_outage_max"] >= values["visibility_timeout"]:
        # A held task is unacknowledged: past the visibility timeout the broker delivers it again while it waits.
        raise ConfigError(
            OUTAGE_MAX_VAR, f"{values['model_outage_max']:g}",
            f"must be below CELERY_BROKER_VISIBILITY_TIMEOUT ({values['visibility_timeout']:g} s), "
            "or a task waiting for the model is delivered again while it waits",
        )


def _warnings(values: dict[str, Any]) -> tuple[str, ...]:
    found = []
    if not values["broker_url"].startswith("sqs://") and values["visibility_timeout"] <= values["model_read_timeout"]:
        found.append(
            "CELERY_BROKER_VISIBILITY_TIMEOUT does not exceed FORWARDER_MODEL_READ_TIMEOUT: a task still "
            "running when the visibility timeout passes is delivered again"
        )
    longest_hold = values["model_outage_max"] + values["model_connect_timeout"] + values["model_read_timeout"]
    if not values["broker_url"].startswith("sqs://") and longest_hold >= values["visibility_timeout"] > values["model_outage_max"]:
        found.append(
            "CELERY_BROKER_VISIBILITY_TIMEOUT does not exceed FORWARDER_MODEL_OUTAGE_MAX plus the model timeouts: "
            "a task that waited out an outage and then runs long is delivered again"
        )
    if values["result_backend"].startswith(("redis://", "rediss://")) and (
        values["max_result_bytes"] > REDIS_MAX_VALUE - _META_ROOM
    ):
        found.append(
            "FORWARDER_MAX_RESULT_BYTES is above what Redis stores in one value (512 MiB by default, less "
            "Celery's meta): a result that large fails in the store (Celery's BackendStoreError, an internal "
            "error with no llm-engine error meta and no hooks) after the worker has held several copies of it"
        )
    if values["pool"] == "gevent":
        for attr, name in (
            ("max_tasks_per_child", "CELERY_WORKER_MAX_TASKS_PER_CHILD"),
            ("max_memory_per_child", "CELERY_WORKER_MAX_MEMORY_PER_CHILD"),
        ):
            if values[attr] is not None:
                found.append(f"{name} has no effect under the gevent pool (one process, no children); ignored")
    return tuple(found)


def apply_endpoint_config(
    values: dict[str, Any], config: Mapping[str, Any], path: str
) -> tuple[dict[str, Any], list[str]]:
    """Fill settings from llm-engine's endpoint config where the environment left them unset; pure.

    Returns the merged values and a warning per hook the config names that this worker does not run
    (llm-engine's API still accepts ``billing``, which its own forwarder cannot build either). Those are
    skipped; the others run. FORWARDER_HOOKS, set by an operator, stays strict.
    """
    merged = dict(values)
    warnings: list[str] = []
    listed = config.get("post_inference_hooks") or []
    if not merged["hooks"] and listed:
        if not isinstance(listed, list):
            raise ConfigError("FORWARDER_ENDPOINT_CONFIG_PATH", path, "post_inference_hooks must be a list")
        names = [str(name).strip().lower() for name in listed]
        unknown = [name for name in dict.fromkeys(names) if name not in HOOK_NAMES]
        warnings += [f"endpoint config hook {name!r} is not run by this worker; skipped (runs: "
                     f"{', '.join(HOOK_NAMES)})" for name in unknown]
        merged["hooks"] = tuple(name for name in dict.fromkeys(names) if name in HOOK_NAMES)
    simple = {
        "endpoint_id": "endpoint_id",
        "endpoint_name": "endpoint_name",
        "endpoint_user_id": "user_id",
        "bundle_id": "bundle_id",
        "callback_url": "default_callback_url",
    }
    for attr, key in simple.items():
        if not merged[attr] and config.get(key):
            merged[attr] = str(config[key])
    if not merged["labels"] and isinstance(config.get("labels"), dict):
        merged["labels"] = config["labels"]
    auth = config.get("default_callback_auth") or {}
    if not merged["callback_username"] and isinstance(auth, dict) and auth.get("kind", "basic") == "basic":
        merged["callback_username"] = str(auth.get("username") or "")
        merged["callback_password"] = str(auth.get("password") or "")
    return merged, warnings


def effective_config(settings: Settings) -> dict[str, str]:
    """Every variable's value in force (the endpoint config's included), as it would be set, secrets masked.

    A secret variable (``errors.is_secret_variable``) shows ``***`` when set; a URL shows neither its password
    nor its query (a callback URL may carry a token there): ``urls.safe_url``.
    """
    shown: dict[str, str] = {}
    for var in VARS:
        text = _as_env_value(getattr(settings, var.attr))
        if is_secret_variable(var.name):
            text = MASK if text else ""
        elif "://" in text:
            text = safe_url(text)
        shown[var.name] = text
    return shown


def _as_env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else ""
    return str(value)


def describe() -> str:
    """The environment table for ``--help``: every variable, its default and meaning."""
    width = max(len(var.name) for var in VARS)
    lines = []
    for var in VARS:
        default = var.default if var.default != "" else "(unset)"
        lines.append(f"  {var.name:<{width}}  default: {default}\n  {'':<{width}}  {var.help}")
    return "\n".join(lines)
