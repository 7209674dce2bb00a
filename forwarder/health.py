"""The worker's health files and the two probes that read them (``python -m forwarder probe live|ready``).

Standard library only, and no import of the rest of ``forwarder``: a probe runs every few seconds in the
container, so it loads neither Celery nor gevent nor the settings, and never talks to the broker. The two
variables it needs are parsed here, once; ``forwarder.settings.VARS`` declares them with these parsers.

Files, in ``FORWARDER_HEALTH_DIR``:

- ``live``: its mtime is the heartbeat, refreshed every ``beat_interval`` seconds by a timer on the
  consumer's own event loop (``forwarder.extensions.probes``). ``probe live`` fails when it is older than
  ``FORWARDER_LIVENESS_MAX_AGE``.
- ``ready``: written once the worker consumes, removed as soon as a warm shutdown starts and at stop.
  ``probe ready`` needs it and a fresh heartbeat.
- ``model-away``: written while the model server is away (``forwarder.model_outage``); ``probe ready``
  fails while it exists, ``probe live`` does not look at it (the forwarder must not be restarted because
  its model is).
- ``stopping``: written when a warm shutdown starts. The loop no longer turns while the worker waits
  for its running tasks (prefork joins its children), so ``probe live`` passes while it exists: the
  pod's grace period, not the liveness probe, bounds a warm shutdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

HEALTH_DIR_ENV = "FORWARDER_HEALTH_DIR"
DEFAULT_HEALTH_DIR = "/tmp/forwarder-health"  # noqa: S108  (per container; the probe must find it unconfigured)
LIVENESS_MAX_AGE_ENV = "FORWARDER_LIVENESS_MAX_AGE"
DEFAULT_LIVENESS_MAX_AGE = "60"
LIVE, READY, STOPPING, MODEL_AWAY = "live", "ready", "stopping", "model-away"
PROBES = ("live", "ready")
EXIT_PASS, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def parse_health_dir(raw: str) -> str:
    value = raw.strip()
    if not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    return value


def parse_max_age(raw: str) -> float:
    value = float(raw.strip())
    if not 1 <= value < float("inf"):
        raise ValueError("must be a number of seconds >= 1")
    return value


def beat_interval(max_age: float) -> float:
    """Seconds between heartbeats: a quarter of the max age (at least 3 beats missed to fail), 0.25-10 s."""
    return min(10.0, max(0.25, max_age / 4))


class HealthFiles:
    """The health folder of one worker: written by the worker, read by the probes."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)

    def reset(self) -> None:
        """At start: create the folder and drop what an earlier run left."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (LIVE, READY, STOPPING, MODEL_AWAY):
            self._remove(name)

    def beat(self) -> None:
        """Refresh the heartbeat (the ``live`` file's mtime), creating it if missing."""
        path = self.dir / LIVE
        try:
            os.utime(path)
        except FileNotFoundError:
            self.dir.mkdir(parents=True, exist_ok=True)
            path.touch()

    def mark_ready(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / READY).touch()

    def mark_stopping(self) -> None:
        """A warm shutdown started: not ready any more; live until the process exits."""
        self._remove(READY)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / STOPPING).touch()

    def mark_stopped(self) -> None:
        self._remove(READY)

    def mark_model_away(self, away: bool) -> None:
        """The model server went away (True) or came back (False): ``probe ready`` fails in between."""
        if away:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / MODEL_AWAY).touch()
        else:
            self._remove(MODEL_AWAY)

    def age(self, name: str, now: float | None = None) -> float | None:
        """Seconds since the file ``name`` was last written, or None when there is none."""
        try:
            mtime = (self.dir / name).stat().st_mtime
        except FileNotFoundError:
            return None
        return max(0.0, (time.time() if now is None else now) - mtime)

    def beat_age(self, now: float | None = None) -> float | None:
        """Seconds since the last heartbeat, or None when there is none."""
        return self.age(LIVE, now)

    def has(self, name: str) -> bool:
        return (self.dir / name).exists()

    def _remove(self, name: str) -> None:
        try:
            (self.dir / name).unlink()
        except FileNotFoundError:
            pass


def check_live(files: HealthFiles, max_age: float) -> tuple[bool, str]:
    """(passed, one line): the consumer's loop beat within ``max_age`` seconds (or a warm shutdown runs)."""
    if files.has(STOPPING):
        return True, "live: warm shutdown in progress"
    age = files.beat_age()
    if age is None:
        return False, f"not live: no heartbeat in {files.dir} (worker not started yet?)"
    if age > max_age:
        return False, f"not live: last heartbeat {age:.1f}s ago (max {max_age:g}s): the worker's loop is stuck"
    return True, f"live: last heartbeat {age:.1f}s ago"


def check_ready(files: HealthFiles, max_age: float) -> tuple[bool, str]:
    """(passed, one line): the worker consumes, is not shutting down, and its loop beats."""
    if not files.has(READY):
        why = "shutting down" if files.has(STOPPING) else "not consuming yet (or stopped)"
        return False, f"not ready: {why}"
    live, line = check_live(files, max_age)
    if not live:
        return False, line.replace("not live", "not ready", 1)
    away = files.age(MODEL_AWAY)
    if away is not None:
        return False, f"not ready: the model server is away (for {away:.0f}s); intake paused"
    return True, "ready"


def run_probe(which: str, environ: Mapping[str, str]) -> int:
    """Run one probe against the environment's health folder; prints one line; returns the exit status."""
    try:
        directory = parse_health_dir(environ.get(HEALTH_DIR_ENV, DEFAULT_HEALTH_DIR))
    except ValueError as exc:
        return _config_error(HEALTH_DIR_ENV, environ.get(HEALTH_DIR_ENV, ""), exc)
    try:
        max_age = parse_max_age(environ.get(LIVENESS_MAX_AGE_ENV, DEFAULT_LIVENESS_MAX_AGE))
    except ValueError as exc:
        return _config_error(LIVENESS_MAX_AGE_ENV, environ.get(LIVENESS_MAX_AGE_ENV, ""), exc)
    check = check_live if which == "live" else check_ready
    passed, line = check(HealthFiles(directory), max_age)
    print(f"forwarder: {line}", file=sys.stdout if passed else sys.stderr)
    return EXIT_PASS if passed else EXIT_FAIL


def add_probe_parser(commands: argparse._SubParsersAction) -> None:
    """The ``probe`` subcommand (shared by ``cli.parser`` and the stdlib-only path in ``forwarder.launch``)."""
    probe = commands.add_parser(
        "probe",
        help="Kubernetes probe: exit 0 if the worker is live/ready, 1 if not (no Celery, no broker)",
        usage="%(prog)s {live,ready}",
        description=f"Read the worker's health files in {HEALTH_DIR_ENV} (default {DEFAULT_HEALTH_DIR}). "
        f"live: the consumer's loop beat within {LIVENESS_MAX_AGE_ENV} seconds (default "
        f"{DEFAULT_LIVENESS_MAX_AGE}). ready: live, consuming, the model server not away, and not in a warm "
        "shutdown. "
        "Exit 0: pass; 1: fail; 2: invalid variable.",
    )
    probe.add_argument("check", nargs="?", choices=PROBES, metavar="{live,ready}", help="which probe")
    probe.set_defaults(probe_parser=probe)


def require_probe(args: argparse.Namespace) -> str:
    """The probe named on the command line; without one, the usage line and what to add (exit 2)."""
    if args.check is None:
        args.probe_parser.error("name the probe: live (the worker's loop beats) or ready (live, consuming, not "
                                "shutting down)")
    return str(args.check)


def probe_main(argv: Sequence[str], environ: Mapping[str, str] | None = None,
               prog: str = "python -m forwarder") -> int:
    """``python -m forwarder probe ...`` without loading the worker (called from ``forwarder.launch``)."""
    root = argparse.ArgumentParser(prog=prog)
    add_probe_parser(root.add_subparsers(dest="command"))
    args = root.parse_args(list(argv))
    return run_probe(require_probe(args), os.environ if environ is None else environ)


def _config_error(name: str, raw: str, exc: ValueError) -> int:
    reason = "is not a number" if str(exc).startswith("could not convert") else str(exc)
    print(f"forwarder: configuration error: {name}={raw!r} {reason}", file=sys.stderr)
    return EXIT_CONFIG
