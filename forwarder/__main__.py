"""Entry point: ``python -m forwarder`` (production: ``ddtrace-run python -m forwarder``).

The pool bootstrap must run first: it patches gevent before anything imports a socket.
"""

from forwarder.pool_bootstrap import bootstrap

POOL = bootstrap()

from forwarder.cli import main  # noqa: E402  (must follow the gevent patch)

raise SystemExit(main())
