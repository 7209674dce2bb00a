"""Memory diagnostics (``FORWARDER_MEMORY_DEBUG=1``): per-process allocation tracing and periodic dumps.

``start_memory_debug(settings)`` starts ``tracemalloc`` in the calling process and logs one dump (one
record, logger ``forwarder.memory``, at INFO whatever the log level) every interval and on SIGUSR2.
Guarantees: the signal handler only wakes the dumper; under gevent the heavy part runs in gevent's
thread pool, so the hub keeps switching; a forked child never uses its parent's dumper; nothing but the
standard library is imported. How to read a dump: docs/MEMORY.md.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("forwarder.memory")

#: The first words of every dump's first line (grep for it).
MARKER = "memory dump"
#: The signal that asks a process for an immediate dump.
DUMP_SIGNAL = signal.SIGUSR2
#: Frames stored per traced allocation: one is enough for ``statistics("lineno")`` and cheapest.
TRACE_FRAMES = 1

_MB = 1e6
_INTERPRETATION = (
    "hint: untracked = RSS - tracked = interpreter and imports before tracing, shared libraries (rss_file), "
    "C extensions, tracemalloc's own tables and allocator free lists/fragmentation; "
    "compare dumps: tracked growing -> see the sites below; untracked growing while tracked is flat -> native "
    "memory or fragmentation (try MALLOC_ARENA_MAX=2 or jemalloc)"
)


@dataclass
class _State:
    """Everything the dumper of one process holds (rebuilt in each prefork child)."""

    pid: int
    interval: float
    top: int
    mode: str  # "thread" or "gevent"
    seq: int = 0
    signal_pending: bool = False
    in_flight: set[str] = field(default_factory=set)
    started: int = 0
    finished: int = 0
    wake_read: int = -1  # thread mode: self-pipe the signal handler writes to
    wake_write: int = -1
    gevent_event: Any = None  # gevent mode
    gevent_signal: Any = None
    worker: Any = None  # the thread or greenlet


_state: _State | None = None
_fork_hook_registered = False


def start_memory_debug(settings: Any) -> None:
    """Trace allocations in this process and dump memory every interval and on SIGUSR2.

    Parameters:
        settings: the worker ``Settings``; reads ``memory_debug_interval`` (seconds) and
            ``memory_debug_top`` (allocation sites per dump).

    Idempotent within a process; in a forked child it starts afresh.
    """
    global _state, _fork_hook_registered
    if _state is not None and _state.pid == os.getpid():
        return
    import tracemalloc

    if not tracemalloc.is_tracing():
        tracemalloc.start(TRACE_FRAMES)
    logger.setLevel(logging.INFO)  # dumps were asked for explicitly: show them at any worker log level
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_forget_after_fork)
        _fork_hook_registered = True
    state = _State(
        pid=os.getpid(),
        interval=float(settings.memory_debug_interval),
        top=int(settings.memory_debug_top),
        mode="gevent" if _gevent_active() else "thread",
    )
    _state = state
    if state.mode == "gevent":
        _start_gevent(state)
    else:
        _start_thread(state)
    logger.info(
        "memory debug on: pid=%d mode=%s interval=%gs top=%d signal=%s",
        state.pid, state.mode, state.interval, state.top, DUMP_SIGNAL.name,
    )


# ---------------------------------------------------------------------------------- in-flight tasks


def task_started(task_id: str) -> None:
    """Count a task as in flight in this process (for the dumps)."""
    state = _state
    if state is not None and state.pid == os.getpid():
        state.in_flight.add(str(task_id))
        state.started += 1


def task_finished(task_id: str) -> None:
    """Count a task as finished in this process."""
    state = _state
    if state is not None and state.pid == os.getpid():
        state.in_flight.discard(str(task_id))
        state.finished += 1


# ------------------------------------------------------------------------------------ thread mode


def _start_thread(state: _State) -> None:
    state.wake_read, state.wake_write = os.pipe()
    os.set_blocking(state.wake_write, False)
    _install_signal(lambda: signal.signal(DUMP_SIGNAL, _on_signal_thread))
    state.worker = threading.Thread(target=_thread_loop, args=(state,), name="forwarder-memory-debug", daemon=True)
    state.worker.start()


def _on_signal_thread(signum: int, frame: Any) -> None:
    # Runs in the main thread between bytecodes: record the request and wake the dumper, nothing more.
    state = _state
    if state is None or state.pid != os.getpid() or state.wake_write < 0:
        return
    state.signal_pending = True
    try:
        os.write(state.wake_write, b"!")
    except OSError:  # pipe full (a dump is already pending) or closed
        pass


def _thread_loop(state: _State) -> None:
    import select

    next_due = time.monotonic() + state.interval
    while _state is state:
        timeout = max(0.0, next_due - time.monotonic())
        try:
            readable, _, _ = select.select([state.wake_read], [], [], timeout)
        except (OSError, ValueError):  # the pipe was closed: this state is over
            return
        if readable:
            try:
                os.read(state.wake_read, 512)
            except OSError:
                return
        reason = _take_reason(state, next_due)
        if reason is None:
            continue
        if reason == "interval":
            next_due = _advance(next_due, state.interval)
        _dump(state, reason)


# ------------------------------------------------------------------------------------ gevent mode


def _gevent_active() -> bool:
    """True when gevent has monkey-patched threading in this process (never imports gevent itself)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def _start_gevent(state: _State) -> None:
    import gevent
    from gevent.event import Event

    state.gevent_event = Event()

    def install() -> None:
        state.gevent_signal = gevent.signal_handler(DUMP_SIGNAL, _on_signal_gevent, state)

    _install_signal(install)
    state.worker = gevent.spawn(_gevent_loop, state)


def _on_signal_gevent(state: _State) -> None:
    # gevent delivers the signal from its loop in a new greenlet; still, only flag and wake.
    if state.pid == os.getpid():
        state.signal_pending = True
        state.gevent_event.set()


def _gevent_loop(state: _State) -> None:
    import gevent

    event = state.gevent_event
    next_due = time.monotonic() + state.interval
    while _state is state:
        event.wait(max(0.0, next_due - time.monotonic()))
        event.clear()
        reason = _take_reason(state, next_due)
        if reason is None:
            continue
        if reason == "interval":
            next_due = _advance(next_due, state.interval)
        try:
            # The snapshot and statistics are CPU-bound: a native thread interleaves with the hub on the
            # GIL instead of stalling every greenlet for the whole dump. Logging stays in this greenlet.
            facts = gevent.get_hub().threadpool.apply(_collect, (state,))
            _log(state, reason, facts)
        except Exception as exc:  # diagnostics must never take the worker down
            logger.warning("memory dump failed in pid %d: %s: %s", state.pid, type(exc).__name__, exc)


# ---------------------------------------------------------------------------------------- common


def _install_signal(install: Any) -> None:
    try:
        install()
    except ValueError as exc:  # not the main thread: interval dumps still run
        logger.warning("memory debug: no %s handler in pid %d (%s); interval dumps only", DUMP_SIGNAL.name, os.getpid(), exc)


def _take_reason(state: _State, next_due: float) -> str | None:
    if state.signal_pending:
        state.signal_pending = False
        return "signal"
    if time.monotonic() >= next_due:
        return "interval"
    return None


def _advance(next_due: float, interval: float) -> float:
    """The next due time, skipping slots missed while a dump (or a stalled process) ran late."""
    now = time.monotonic()
    next_due += interval
    if next_due <= now:
        next_due = now + interval
    return next_due


def _dump(state: _State, reason: str) -> None:
    try:
        _log(state, reason, _collect(state))
    except Exception as exc:  # diagnostics must never take the worker down
        logger.warning("memory dump failed in pid %d: %s: %s", state.pid, type(exc).__name__, exc)


def _collect(state: _State) -> dict[str, Any]:
    """Measure this process: RSS first (before the snapshot inflates it), then the Python heap."""
    import tracemalloc

    began = time.perf_counter()
    rss, rss_anon, rss_file = _rss_bytes()
    current, peak = tracemalloc.get_traced_memory()
    overhead = tracemalloc.get_tracemalloc_memory()
    # Group first, then drop tracemalloc's own (and this module's) sites: Snapshot.filter_traces runs
    # fnmatch per trace in Python (~50 us each, seconds for a large heap); grouping is ~5 us per trace.
    skip = {tracemalloc.__file__, __file__, "<unknown>"}
    snapshot = tracemalloc.take_snapshot()
    sites = []
    for stat in snapshot.statistics("lineno"):
        frame = stat.traceback[0]
        if frame.filename in skip:
            continue
        sites.append((stat.size, stat.count, f"{frame.filename}:{frame.lineno}"))
        if len(sites) == state.top:
            break
    del snapshot
    return {
        "rss": rss, "rss_anon": rss_anon, "rss_file": rss_file, "tracked": current, "peak": peak,
        "overhead": overhead, "sites": sites, "took": time.perf_counter() - began,
        "in_flight": len(state.in_flight), "started": state.started, "finished": state.finished,
    }


def _log(state: _State, reason: str, facts: dict[str, Any]) -> None:
    state.seq += 1
    rss, tracked = facts["rss"], facts["tracked"]
    lines = [
        f"{MARKER} pid={state.pid} reason={reason} seq={state.seq} ppid={os.getppid()} took_ms={facts['took'] * 1e3:.1f}",
        f"  rss_mb={rss / _MB:.1f} rss_anon_mb={facts['rss_anon'] / _MB:.1f} rss_file_mb={facts['rss_file'] / _MB:.1f}"
        f" tracked_mb={tracked / _MB:.2f} tracked_peak_mb={facts['peak'] / _MB:.2f}"
        f" untracked_mb={(rss - tracked) / _MB:.1f} tracemalloc_self_mb={facts['overhead'] / _MB:.2f}",
        f"  {_INTERPRETATION}",
        f"  in_flight={facts['in_flight']} started={facts['started']} finished={facts['finished']}",
        f"  top {len(facts['sites'])} allocation sites (size, blocks, file:line):",
    ]
    lines += [f"    {size / _MB:9.3f} MB {count:8d} blocks  {where}" for size, count, where in facts["sites"]]
    lines.append(f"  end {MARKER} pid={state.pid}")
    logger.info("\n".join(lines))


def _rss_bytes() -> tuple[int, int, int]:
    """(RSS, anonymous RSS, file-backed RSS) of this process in bytes, from /proc (Linux)."""
    values = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open("/proc/self/status", "rb") as handle:
            for raw in handle:
                key, _, rest = raw.decode("ascii", "replace").partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) * 1024  # reported in kB
    except OSError:
        import resource

        values["VmRSS"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, not current
    return values["VmRSS"], values["RssAnon"], values["RssFile"]


def _forget_after_fork() -> None:
    # A forked child must not use (or signal) the parent's pipe and dumper: drop them; the child starts
    # its own in worker_process_init. The child's copy of the pipe is closed; the parent's stays open.
    global _state
    state, _state = _state, None
    if state is not None and state.mode == "thread":
        for fd in (state.wake_read, state.wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
