"""Command line: run the worker (default), ``check`` the environment or ``probe`` it (the demo: ``make demo``).

Exit statuses: 0 done, 2 invalid configuration, 3 model server not ready, 1 anything else (``probe``: the
probe failed). ``probe`` does not come through here when launched: ``forwarder.launch`` sends it to
``forwarder.health`` before anything else is imported; ``main(["probe", ...])`` runs the same code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from forwarder import __version__
from forwarder.errors import ConfigError
from forwarder.health import HealthFiles, add_probe_parser, require_probe, run_probe
from forwarder.pool_bootstrap import EXIT_CONFIG
from forwarder.pools import ensure_open_files
from forwarder.settings import describe, load_settings
from forwarder.shutdown_budget import grace_period_parts
from forwarder.urls import safe_url
from gateways.model_server import ModelNotReady

EXIT_NOT_READY = 3
DEMO_MOVED = ("forwarder: the demo is dev tooling, run from a source checkout: "
              "make demo, or python -m devtools.demo --pool prefork|gevent")
logger = logging.getLogger("forwarder")


def parser(prog: str = "python -m forwarder") -> argparse.ArgumentParser:
    """The argument parser; configuration itself comes only from the environment."""
    root = argparse.ArgumentParser(
        prog=prog,
        description="Celery worker that forwards llm-engine async tasks to a model HTTP server. "
        "Configured only through environment variables:",
        epilog=describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--version", action="version", version=f"celery-forwarder {__version__}")
    commands = root.add_subparsers(dest="command", metavar="{run,check,probe}")
    commands.add_parser("run", help="run the worker (the default)")
    commands.add_parser("check", help="validate the environment and exit")
    add_probe_parser(commands)
    return root


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         prog: str = "python -m forwarder") -> int:
    """Parse the command, load settings and run it; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # once a command here; the runtime never imports dev tooling
        print(DEMO_MOVED, file=sys.stderr)
        return EXIT_CONFIG
    args = parser(prog).parse_args(argv)
    env = os.environ if environ is None else environ
    if args.command == "probe":
        return run_probe(require_probe(args), env)
    try:
        settings = load_settings(env)
        raised = ensure_open_files(settings.pools.open_files)
    except ConfigError as exc:
        print(f"forwarder: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:  # the open-file limit cannot hold the concurrency
        print(f"forwarder: configuration error: CELERY_WORKER_CONCURRENCY={settings.concurrency} {exc}",
              file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        if raised:
            print(f"forwarder: {raised}", file=sys.stderr)
        print(f"forwarder: configuration OK (pool={settings.pool}, queue={settings.queue}, broker={safe_url(settings.broker_url)})")
        parts = grace_period_parts(settings)
        print(f"forwarder: terminationGracePeriodSeconds >= {sum(parts.values())} "
              f"({' + '.join(f'{name} {seconds}' for name, seconds in parts.items())})")
        print(f"forwarder: a model outage holds each task taken up to {settings.model_outage_max:g} s, then hands it "
              "back (a warm shutdown hands it back at once, so the grace period above is unchanged)")
        for warning in settings.warnings:
            print(f"forwarder: warning: {warning}")
        return 0
    try:
        # Before anything else, and before the wait for the model: files a previous container left in the folder
        # (an emptyDir outlives its containers) must not pass this one's startup or readiness probe.
        HealthFiles(settings.health_dir).reset()
    except OSError as exc:
        print(f"forwarder: configuration error: FORWARDER_HEALTH_DIR={settings.health_dir!r} cannot be written "
              f"({exc.strerror or exc})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        from forwarder.worker import run_worker

        return run_worker(settings, notes=(raised,) if raised else ())  # logged in the chosen format
    except ModelNotReady as exc:
        print(f"forwarder: {exc}", file=sys.stderr)
        return EXIT_NOT_READY

