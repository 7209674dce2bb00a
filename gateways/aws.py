"""The one place that makes boto3 sessions and clients, so every AWS call has timeouts and bounded retries.

Rules kept here:
- Always an explicit ``boto3.session.Session()``, never boto3's module-level default session: sessions
  are not thread-safe, and clients built concurrently from the default session fail (boto3#2750).
  Callers build clients once per process (through ``gateways.cached_client.CachedClient``), never per task.
- Region: ``AWS_REGION`` when set (as the other AWS SDKs and EKS set it), else botocore's own resolution
  (``AWS_DEFAULT_REGION``, then the shared config file). botocore itself reads only ``AWS_DEFAULT_REGION``.
- Endpoint: botocore honours ``AWS_ENDPOINT_URL`` and ``AWS_ENDPOINT_URL_<SERVICE>`` by itself (moto in
  tests, VPC endpoints in production); nothing here reads them.
- Every client gets connect/read timeouts and bounded "standard" retries, so no AWS call can block a
  worker slot for long.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config

#: Seconds to open a connection to an AWS endpoint.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for an AWS answer once connected.
READ_TIMEOUT = 10.0
#: Attempts in all per call (the first try plus 2 retries), botocore "standard" mode (backoff with jitter).
#: Passed as ``total_max_attempts``: botocore's Config key ``max_attempts`` counts retries only (3 would
#: mean 4 attempts), unlike AWS_MAX_ATTEMPTS and the config file, which count attempts.
MAX_ATTEMPTS = 3
#: botocore's own default pool size; callers size it to their concurrency.
MAX_POOL_CONNECTIONS = 10


@dataclass(frozen=True)
class StaticCredentials:
    """Explicit credentials (e.g. from STS AssumeRole) for one client; never logged."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str = field(default="", repr=False)


def new_session(region: str | None = None, environ: Mapping[str, str] | None = None) -> boto3.session.Session:
    """A fresh boto3 session (never the default one) in the resolved region.

    The default credential chain applies (env, web identity, container/instance role...).
    """
    env = os.environ if environ is None else environ
    return boto3.session.Session(region_name=region or env.get("AWS_REGION") or None)


def client_config(
    max_pool_connections: int = MAX_POOL_CONNECTIONS,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    max_attempts: int = MAX_ATTEMPTS,
) -> Config:
    """botocore Config with timeouts, bounded standard-mode retries and a sized connection pool."""
    return Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
    )


def make_client(
    service: str,
    *,
    session: boto3.session.Session | None = None,
    credentials: StaticCredentials | None = None,
    max_pool_connections: int = MAX_POOL_CONNECTIONS,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    max_attempts: int = MAX_ATTEMPTS,
    endpoint_url: str | None = None,
) -> Any:
    """A boto3 client for ``service``, from ``session`` (default: a new one) and optional explicit credentials.

    ``endpoint_url`` overrides botocore's own resolution (``AWS_ENDPOINT_URL[_<SERVICE>]``, then AWS).

    Raises:
        botocore.exceptions.NoRegionError: no region is configured (AWS_REGION / AWS_DEFAULT_REGION).
    """
    session = session or new_session()
    extra: dict[str, str] = {}
    if credentials is not None:
        extra = {"aws_access_key_id": credentials.access_key, "aws_secret_access_key": credentials.secret_key}
        if credentials.token:
            extra["aws_session_token"] = credentials.token
    config = client_config(
        max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_attempts=max_attempts,
    )
    return session.client(service, config=config, endpoint_url=endpoint_url, **extra)
