"""Entry point: ``python -m forwarder`` (production: ``ddtrace-run python -m forwarder``).

The same as the ``celery-forwarder`` console script: both run ``forwarder.launch.main``, which runs the pool
bootstrap (the gevent patch) before anything else is imported, and sends ``probe`` to the stdlib-only
``forwarder.health``.
"""

from forwarder.launch import MODULE_PROG, main

raise SystemExit(main(prog=MODULE_PROG))
