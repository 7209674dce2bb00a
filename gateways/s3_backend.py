"""Celery's S3 result backend, with one S3 client per process from ``gateways.cached_client``.

Why not the stock ``celery.backends.s3.S3Backend`` as is:
- it builds a boto3 Session and resource in ``__init__``. The worker's main process builds
  ``app.backend`` (the start-up banner prints it) and billiard then forks the prefork children, so every
  child would share the parent's session, credential provider and connection pool;
- with ``result_backend_thread_safe`` off, gevent builds a backend, hence a boto3 session, per greenlet
  (measured: ~220 ms and tens of MB each). The client here is cached per process and per configuration,
  whatever number of backend objects Celery makes;
- ``get`` costs HEAD then GET, and Celery reads before every write (``_store_result`` checks the stored
  state first), so each task paid two extra requests; here it is one GET;
- botocore's defaults: 60 s connect and read timeouts, a pool of 10 connections (fewer than a gevent
  worker's slots).

The stored objects are exactly the stock backend's: key ``<base_path>celery-task-meta-<task_id>``, body
the encoded meta. A producer configured with the stock backend (``s3_bucket``, ``s3_base_path``) reads
them with ``AsyncResult``, as llm-engine's gateway does.

Selection: a ``<class path>+s3://bucket/prefix`` value as an app's ``backend_cls`` (Celery splits it into
the class to import and the URL to hand it); ``forwarder.app`` does this for its own app only: nothing
global, such as ``celery.app.backends.BACKEND_ALIASES``, is changed, and other apps in the process keep
the stock ``s3://`` backend.

The URL's path is the key prefix and always ends with ``/``: ``s3://bucket/tmp/celery`` stores
``tmp/celery/celery-task-meta-<id>`` (llm-engine's default base path is ``tmp/celery/``; a reader
sets ``s3_base_path`` to the same). Without a URL the stock keys ``s3_bucket`` and ``s3_base_path``
are read. Also read: ``s3_region``, ``s3_endpoint_url``, ``s3_access_key_id``/``s3_secret_access_key``
(stock; unset means boto3's own chain, including ``AWS_ENDPOINT_URL`` and ``AWS_DEFAULT_REGION``), and
``s3_connect_timeout``, ``s3_read_timeout``, ``s3_max_attempts``, ``s3_max_pool_connections`` (this
module's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions
from celery.backends.s3 import S3Backend
from celery.exceptions import ImproperlyConfigured
from kombu.utils.encoding import bytes_to_str

from gateways.aws import StaticCredentials, make_client, new_session
from gateways.cached_client import CachedClient

logger = logging.getLogger(__name__)

#: Name of the client cache: its "client built (pid N ...)" log line is counted by the tests.
CLIENT_NAME = "s3-results"

CONNECT_TIMEOUT = 5.0
#: A result is a small JSON object; a read stalled this long is a broken connection, not a slow one.
READ_TIMEOUT = 30.0
#: Attempts in all (botocore "standard" retry mode: throttling, 5xx and connection errors, with backoff).
MAX_ATTEMPTS = 3
MIN_POOL_CONNECTIONS = 10

_MISSING = ("NoSuchKey", "404")
_RETRYABLE_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable")
_RETRYABLE_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectTimeoutError,
)
_DENIED = ("AccessDenied", "403")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``("bucket", "prefix/")``; no prefix gives ``""``.

    Raises:
        ImproperlyConfigured: not an ``s3://`` URL naming a bucket.
    """
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ImproperlyConfigured(f"S3 result backend URL must be s3://bucket/prefix, got {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


@dataclass(frozen=True)
class S3ClientConfig:
    """Everything the S3 client depends on; equal configurations share one client per process."""

    region: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    max_attempts: int = MAX_ATTEMPTS
    max_pool_connections: int = MIN_POOL_CONNECTIONS


def build_s3_client(config: S3ClientConfig) -> tuple[Any, None]:
    """One explicit boto3 session and its S3 client (pure: touches no cache). Clients never expire:
    the session's credential provider refreshes temporary credentials by itself.

    Raises:
        ImproperlyConfigured: boto3 finds no credentials.
    """
    session = new_session(config.region)
    credentials = None
    if config.access_key_id and config.secret_access_key:
        credentials = StaticCredentials(config.access_key_id, config.secret_access_key)
    elif session.get_credentials() is None:
        raise ImproperlyConfigured("S3 result backend: boto3 found no AWS credentials")
    client = make_client(
        "s3",
        session=session,
        credentials=credentials,
        endpoint_url=config.endpoint_url,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        max_attempts=config.max_attempts,
        max_pool_connections=config.max_pool_connections,
    )
    return client, None


def _close_client(client: Any) -> None:
    client.close()


#: One cache per client configuration; ``setdefault`` is atomic, so no lock (a lost race costs an
#: unused, never-built cache object).
_caches: dict[S3ClientConfig, CachedClient[Any]] = {}


def s3_client(config: S3ClientConfig) -> Any:
    """The process's S3 client for ``config``: built on first use, and again in a forked child."""
    cache = _caches.get(config)
    if cache is None:
        cache = _caches.setdefault(
            config, CachedClient(CLIENT_NAME, lambda: build_s3_client(config), close=_close_client)
        )
    return cache.get()


def client_builds() -> int:
    """S3 clients built in this process so far (for tests and diagnostics)."""
    return sum(cache.builds for cache in list(_caches.values()))


class S3ResultBackend(S3Backend):
    """Celery's S3 backend with a per-process cached client; builds nothing until the first request."""

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        # S3Backend.__init__ is skipped on purpose: it connects eagerly (see the module docstring).
        super(S3Backend, self).__init__(url=url, **kwargs)
        conf = self.app.conf
        if url:
            self.bucket_name, self.base_path = parse_s3_url(url)
        else:
            self.bucket_name = conf.get("s3_bucket")
            self.base_path = conf.get("s3_base_path") or ""
        if not self.bucket_name:
            raise ImproperlyConfigured("Missing bucket name")
        self.endpoint_url = conf.get("s3_endpoint_url") or None
        self.aws_region = conf.get("s3_region") or None
        self.aws_access_key_id = conf.get("s3_access_key_id") or None
        self.aws_secret_access_key = conf.get("s3_secret_access_key") or None
        self.client_config = S3ClientConfig(
            region=self.aws_region,
            endpoint_url=self.endpoint_url,
            access_key_id=self.aws_access_key_id,
            secret_access_key=self.aws_secret_access_key,
            connect_timeout=float(conf.get("s3_connect_timeout") or CONNECT_TIMEOUT),
            read_timeout=float(conf.get("s3_read_timeout") or READ_TIMEOUT),
            max_attempts=int(conf.get("s3_max_attempts") or MAX_ATTEMPTS),
            max_pool_connections=max(MIN_POOL_CONNECTIONS, int(conf.get("s3_max_pool_connections") or 0)),
        )
        self._warned_denied = False

    def __reduce__(self, args: tuple = (), kwargs: dict | None = None) -> Any:
        # Keep the URL (bucket and prefix) when pickled, as Celery's URL-configured backends do.
        return super().__reduce__(args, {**(kwargs or {}), "url": self.url})

    @property
    def client(self) -> Any:
        """This process's S3 client (never one built in another process)."""
        return s3_client(self.client_config)

    def _key(self, key: Any) -> str:
        key = bytes_to_str(key)
        return f"{self.base_path}{key}" if self.base_path else key

    def get(self, key: Any) -> Any:
        """The stored value, or None when there is none (one GET, no HEAD)."""
        try:
            response = self.client.get_object(Bucket=self.bucket_name, Key=self._key(key))
        except botocore.exceptions.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return None
            if code in _DENIED:
                # Without s3:ListBucket, S3 answers 403 for a missing key. Celery reads before every
                # write, so raising here would fail every task; a real lack of access still fails the
                # write that follows.
                if not self._warned_denied:
                    self._warned_denied = True
                    logger.warning(
                        "S3 result backend: GET %s answered 403; read as 'no result' (grant s3:ListBucket "
                        "on bucket %s so missing keys answer 404)", self._key(key), self.bucket_name,
                    )
                return None
            raise
        with response["Body"] as body:
            data = body.read()
        return data if self.content_encoding == "binary" else data.decode("utf-8")

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Celery's retry predicate (``result_backend_always_retry``): connection trouble, timeouts, 5xx, throttling."""
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return int(status) >= 500 or str(error.get("Code", "")) in _RETRYABLE_CODES
        return isinstance(exc, _RETRYABLE_ERRORS)

    def set(self, key: Any, value: Any) -> None:
        self.client.put_object(Bucket=self.bucket_name, Key=self._key(key), Body=value)

    def delete(self, key: Any) -> None:
        self.client.delete_object(Bucket=self.bucket_name, Key=self._key(key))
