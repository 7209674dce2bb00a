"""Pool choice and gevent patching: the only code that runs before the monkey-patch.

Stdlib only, and nothing here imports socket, ssl or any third-party module: under the gevent pool
``gevent.monkey.patch_all()`` must run before celery, kombu, redis, requests, boto3 or ssl are
imported, or they keep unpatched sockets and greenlets never yield.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

POOL_ENV = "CELERY_WORKER_POOL"
POOLS = ("prefork", "gevent")
DEFAULT_POOL = "prefork"
#: Exit status for a configuration error (invalid environment), as argparse uses for bad usage.
EXIT_CONFIG = 2


def pool_from_env(environ: Mapping[str, str]) -> str:
    """Return the pool named by ``CELERY_WORKER_POOL`` (any case, as ``settings`` reads it), or raise ValueError
    naming the variable."""
    raw = environ.get(POOL_ENV, DEFAULT_POOL)
    value = raw.strip().lower()
    if value not in POOLS:
        raise ValueError(f"{POOL_ENV}={raw!r} is invalid: expected one of {', '.join(POOLS)}")
    return value


def bootstrap(environ: Mapping[str, str] | None = None) -> str:
    """Choose the pool and patch for gevent if asked; exit 2 with one line on a bad value."""
    try:
        pool = pool_from_env(os.environ if environ is None else environ)
    except ValueError as exc:
        print(f"forwarder: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    if pool == "gevent":
        # Import gevent before patching so ddtrace (bootstrapped by ddtrace-run) can instrument it.
        import gevent  # noqa: F401
        from gevent import monkey

        monkey.patch_all()
    return pool
