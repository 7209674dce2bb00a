"""Entry point: ``python -m forwarder`` (production: ``ddtrace-run python -m forwarder``).

The pool bootstrap must run first: it patches gevent before anything imports a socket. Except for
``probe``, which Kubernetes runs every few seconds: it reads two files (``forwarder.health``, standard
library only) and exits, loading neither gevent nor Celery.
"""

import sys

if sys.argv[1:2] == ["probe"]:
    from forwarder.health import probe_main

    raise SystemExit(probe_main(sys.argv[1:]))

from forwarder.pool_bootstrap import bootstrap  # noqa: E402

POOL = bootstrap()

from forwarder.cli import main  # noqa: E402  (must follow the gevent patch)

raise SystemExit(main())
