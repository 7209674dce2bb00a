"""The URLs of the configuration: parsed in full at ``check`` (and at start), with the parsers the worker runs
them through later, and shown without their secrets.

A URL ``check`` passes must not crash the worker later, so each one goes through what will read it: the
scheme, the host, a port of 1-65535 and, for Redis, a database from 0 to ``REDIS_DATABASES - 1``; then the
broker URL through kombu's ``Connection`` (which refuses a query option it does not take) and a Redis result
backend through Celery's own ``RedisBackend`` (which refuses ``rediss://`` without ``ssl_cert_reqs``, SSL
options on ``redis://``, ...). Neither connects. Each parser raises ``ValueError(reason)``; the reason never
holds the URL (the caller names the variable and shows the URL masked, ``safe_url``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit

#: Databases a Redis (or Valkey, or ElastiCache) server has unless configured otherwise (``databases 16``):
#: a larger index is refused by the server at SELECT ("DB index is out of range"), and the worker would
#: retry its broker forever or fail every result store.
REDIS_DATABASES = 16
#: What a masked secret shows.
MASK = "***"
_NETWORK_SCHEMES = ("http", "https", "redis", "rediss")


def url(*schemes: str) -> Callable[[str], str]:
    """A parser of a URL with one of ``schemes``: a host, a port of 1-65535, a Redis db in range."""

    def parse(raw: str) -> str:
        value = raw.strip()
        parts = urlsplit(value)  # the scheme comes lowercased: normalise the value's own, once
        value = parts.scheme + value[len(parts.scheme):]
        if parts.scheme not in schemes:
            raise ValueError(f"must be a URL with scheme {' or '.join(schemes)}")
        if parts.scheme in _NETWORK_SCHEMES and not parts.hostname:
            raise ValueError("must name a host")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("has a port that is not a number from 1 to 65535")
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError("must name a bucket: s3://bucket/prefix")
        if parts.scheme in ("redis", "rediss"):
            redis_db(parts.path)
        return value

    return parse


def optional_url(*schemes: str) -> Callable[[str], str]:
    strict = url(*schemes)
    return lambda raw: "" if raw.strip() == "" else strict(raw)


def redis_db(path: str) -> int:
    """The database of a Redis URL's path (``/3``; empty: 0), as kombu and Celery read it."""
    name = path.strip("/")
    if name == "":
        return 0
    if not re.fullmatch(r"[0-9]+", name):
        raise ValueError(f"has a Redis database that is not a number from 0 to {REDIS_DATABASES - 1} (the path /<db>)")
    if int(name) >= REDIS_DATABASES:
        raise ValueError(f"has Redis database {int(name)}: a server has {REDIS_DATABASES} (0-{REDIS_DATABASES - 1}) "
                         "unless configured otherwise")
    return int(name)


def broker_url(raw: str) -> str:
    """``CELERY_BROKER_URL``: redis://, rediss:// or sqs://, as kombu's ``Connection`` takes it."""
    value = url("redis", "rediss", "sqs")(raw)
    from kombu import Connection

    try:
        Connection(value)  # parses the URL and its query options; connects only when used
    except TypeError as exc:  # an unknown query option becomes an unexpected keyword argument
        option = re.search(r"argument '(\w+)'", str(exc))
        raise ValueError(f"has a query option kombu does not take ({option.group(1) if option else exc})") from None
    except ValueError as exc:
        raise ValueError(f"is refused by kombu: {_one_line(exc)}") from None
    return value


def result_backend_url(raw: str) -> str:
    """``CELERY_RESULT_BACKEND``: redis://, rediss:// (through Celery's own Redis backend) or s3://."""
    value = url("redis", "rediss", "s3")(raw)
    if urlsplit(value).scheme in ("redis", "rediss"):
        from celery import Celery
        from celery.backends.redis import RedisBackend

        app = Celery(set_as_current=False)
        try:
            RedisBackend(app=app, url=value)  # parses as the worker's backend will; no connection yet
        except (ValueError, TypeError) as exc:
            raise ValueError(f"is refused by Celery's Redis backend: {_one_line(exc)}") from None
        finally:
            app.close()
    return value


def safe_url(text: str) -> str:
    """A URL without its password and its query (a token may sit in either), for logs and messages."""
    parts = urlsplit(text)
    if not parts.password and not parts.query:
        return text  # as written (geturl() would turn sqs:// into sqs:)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", f":{MASK}@"))
    if parts.query:
        parts = parts._replace(query=MASK)
    return parts.geturl()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
