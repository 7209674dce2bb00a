"""The one entry point: ``python -m forwarder`` and the ``celery-forwarder`` console script both run ``main``.

Stdlib only until the pool bootstrap has run: under the gevent pool ``gevent.monkey.patch_all()`` must come
before anything imports a socket. ``probe``, which Kubernetes runs every few seconds, reads two files
(``forwarder.health``, standard library only) and exits, loading neither gevent nor Celery.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

#: The program name in usage lines, as each way of launching spells it.
MODULE_PROG = "python -m forwarder"
SCRIPT_PROG = "celery-forwarder"


def main(argv: Sequence[str] | None = None, prog: str = SCRIPT_PROG) -> int:
    """Run one command line (default ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["probe"]:
        from forwarder.health import probe_main

        return probe_main(args, prog=prog)
    from forwarder.pool_bootstrap import bootstrap

    bootstrap()
    from forwarder.cli import main as cli_main  # must follow the gevent patch

    return cli_main(args, prog=prog)
