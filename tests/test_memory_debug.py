"""FORWARDER_MEMORY_DEBUG against real workers, both pools: dumps on schedule and on SIGUSR2 from the
process signalled (main process or prefork child), and nothing at all without the flag.

What runs inside the worker is observed from outside without mocks: the dumps in its log, the signal
dispositions in /proc/<pid>/status (SigCgt), and every module the worker imports (CPython's
``-X importtime`` report, switched on by PYTHONPROFILEIMPORTTIME in the worker's environment).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from devtools.demo import send
from devtools.servers import wait_for, worker_env

ROOT = Path(__file__).resolve().parent.parent
CHILDREN = Path(__file__).resolve().parent / "children"
INTERVAL = 1.0
TOP = 5
DEBUG_ENV = {
    "FORWARDER_MEMORY_DEBUG": "1",
    "FORWARDER_MEMORY_DEBUG_INTERVAL": str(INTERVAL),
    "FORWARDER_MEMORY_DEBUG_TOP": str(TOP),
    "PYTHONPROFILEIMPORTTIME": "1",
}

DUMP = re.compile(
    r"^\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/[^\]]*\] "
    r"memory dump pid=(?P<pid>\d+) reason=(?P<reason>\S+) seq=(?P<seq>\d+) ppid=(?P<ppid>\d+) took_ms=(?P<took>[\d.]+)\n"
    r"(?P<body>(?:  .*\n)*?)"
    r"  end memory dump pid=(?P=pid)$",
    re.MULTILINE,
)
SITE = re.compile(r"^\s+(?P<mb>[\d.]+) MB\s+(?P<count>\d+) blocks  (?P<file>.+):(?P<line>\d+)$")
NUMBER_FIELDS = ("rss_mb", "rss_anon_mb", "rss_file_mb", "tracked_mb", "tracked_peak_mb", "untracked_mb",
                 "tracemalloc_self_mb", "in_flight", "started", "finished")


@dataclass
class Dump:
    pid: int
    reason: str
    seq: int
    at: datetime
    values: dict[str, float]
    sites: list[tuple[float, int, str, int]]
    text: str


def parse_dumps(output: str) -> list[Dump]:
    """Every dump in a worker log, checked for well-formedness as it is parsed."""
    dumps = []
    for match in DUMP.finditer(output):
        body = match["body"]
        values = {key: float(value) for key, value in re.findall(r"\b([a-z_]+)=(-?[\d.]+)\b", body)}
        values["took_ms"] = float(match["took"])
        missing = [name for name in NUMBER_FIELDS if name not in values]
        assert not missing, f"dump lacks {missing}:\n{match[0]}"
        assert "hint: untracked = RSS - tracked" in body, match[0]
        header = re.search(r"^  top (\d+) allocation sites \(size, blocks, file:line\):$", body, re.MULTILINE)
        assert header, match[0]
        sites = []
        for line in body[header.end():].splitlines():
            if not line.strip():
                continue
            site = SITE.match(line)
            assert site, f"malformed allocation site {line!r} in:\n{match[0]}"
            sites.append((float(site["mb"]), int(site["count"]), site["file"], int(site["line"])))
        assert len(sites) == int(header[1])
        dumps.append(Dump(
            pid=int(match["pid"]), reason=match["reason"], seq=int(match["seq"]),
            at=datetime.strptime(match["ts"], "%Y-%m-%d %H:%M:%S,%f"), values=values, sites=sites, text=match[0],
        ))
    return dumps


def dumps_of(worker, pid: int, reason: str | None = None) -> list[Dump]:
    return [d for d in parse_dumps(worker.output) if d.pid == pid and (reason is None or d.reason == reason)]


def signal_mask(pid: int, mask: str, signum: int) -> bool:
    """Whether ``signum`` is in process ``pid``'s ``mask`` (SigCgt: caught, SigIgn: ignored) in /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{mask}:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    raise AssertionError(f"no {mask} line for pid {pid}")


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum``."""
    return signal_mask(pid, "SigCgt", signum)


def imported_modules(output: str) -> set[str]:
    """Modules named by CPython's -X importtime report ("import time: self | cumulative | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in output.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def worker_pids(worker, pool: str) -> list[int]:
    if pool == "gevent":
        return [worker.pid]
    children = wait_for(lambda: [c.pid for c in worker.children()] if len(worker.children()) == 2 else None,
                        20, "two prefork children")
    return [worker.pid, *children]


def check_well_formed(dump: Dump) -> None:
    values = dump.values
    assert values["rss_mb"] > 10, dump.text
    assert 0 < values["tracked_mb"] <= values["tracked_peak_mb"] + 0.01, dump.text
    # untracked is RSS minus tracked (each rounded on its own).
    assert abs(values["rss_mb"] - values["tracked_mb"] - values["untracked_mb"]) < 0.2, dump.text
    assert len(dump.sites) == TOP, dump.text
    sizes = [site[0] for site in dump.sites]
    assert sizes == sorted(sizes, reverse=True), dump.text
    for _size, count, filename, line in dump.sites:
        assert count > 0 and line >= 0 and filename, dump.text
        assert not filename.endswith(("tracemalloc.py", "forwarder/memory.py")), dump.text


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_dumps_on_schedule_and_on_sigusr2(pool, start_worker, model, producer, queue):
    worker = start_worker(pool, **DEBUG_ENV)
    pids = worker_pids(worker, pool)

    # Every process dumps on its own, once per interval.
    wait_for(lambda: all(len(dumps_of(worker, pid, "interval")) >= 3 for pid in pids), 30,
             f"three interval dumps from each of {pids}", interval=0.2)
    for pid in pids:
        assert catches(pid, signal.SIGUSR2), f"pid {pid} has no SIGUSR2 handler"
        dumps = dumps_of(worker, pid, "interval")
        for dump in dumps:
            check_well_formed(dump)
        # Fixed-rate schedule: compare when dumps started (logged at the end, after took_ms).
        starts = [d.at.timestamp() - d.values["took_ms"] / 1e3 for d in dumps]
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert min(gaps) >= 0.5 * INTERVAL, (pid, gaps)
        assert 0.8 * INTERVAL <= statistics.median(gaps) <= 2.5 * INTERVAL, (pid, gaps)
        assert [d.seq for d in dumps_of(worker, pid)] == list(range(1, len(dumps_of(worker, pid)) + 1))
    # tracemalloc was really started in the worker: the report shows the import, the dumps the heap.
    assert "tracemalloc" in imported_modules(worker.output)

    # Two tasks held by a slow model: SIGUSR2 dumps at once, from the process signalled, with its tasks.
    model.behaviour.delay = 8  # each process is signalled in turn (a dump takes ~1 s under load): tasks still running
    results = [send(producer, {"args": {"id": i}}, queue=queue) for i in range(2)]
    wait_for(lambda: model.behaviour.in_flight == 2, 20, "two requests at the model")
    targets = [worker.pid] if pool == "gevent" else pids  # prefork: the main process and each child
    expected_in_flight = {worker.pid: 2 if pool == "gevent" else 0, **{pid: 1 for pid in pids[1:]}}
    for pid in targets:
        before = len(dumps_of(worker, pid, "signal"))
        sent = time.monotonic()
        os.kill(pid, signal.SIGUSR2)
        wait_for(lambda pid=pid, before=before: len(dumps_of(worker, pid, "signal")) > before, 5,
                 f"a signal dump from pid {pid}", interval=0.05)
        assert time.monotonic() - sent < 3, "the signal dump should not wait for the model"
        dump = dumps_of(worker, pid, "signal")[-1]
        check_well_formed(dump)
        assert dump.values["in_flight"] == expected_in_flight[pid], dump.text
    assert model.behaviour.in_flight == 2, "the dumps ran while both tasks were still in flight"
    for result in results:
        assert result.get(timeout=30)["status_code"] == 200
    # The processes that ran the tasks count them as finished once they are done.
    wait_for(lambda: sum(dumps_of(worker, pid)[-1].values["finished"] for pid in pids) >= 2, 10,
             "dumps counting the finished tasks", interval=0.2)
    assert all(dumps_of(worker, pid)[-1].values["in_flight"] == 0 for pid in pids)
    assert worker.process.poll() is None, "no dump may take the worker down"


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_without_the_flag_nothing_is_imported_started_or_dumped(pool, start_worker, producer, queue):
    env = {**DEBUG_ENV, "FORWARDER_MEMORY_DEBUG": "0"}  # same interval: a dumper, if any, would show fast
    env.pop("PYTHONTRACEMALLOC", None)
    assert "PYTHONTRACEMALLOC" not in os.environ
    worker = start_worker(pool, **env)
    pids = worker_pids(worker, pool)
    result = send(producer, {"args": {"id": 1}}, queue=queue)
    assert result.get(timeout=30)["status_code"] == 200
    time.sleep(3 * INTERVAL)

    output = worker.output
    modules = imported_modules(output)
    assert "forwarder.worker" in modules and "celery" in modules, "the import report works"
    # Never imported anywhere in the worker (parent or children, start-up or task): so never started.
    assert "tracemalloc" not in modules and "forwarder.memory" not in modules
    assert "memory dump" not in output and "memory debug on" not in output
    # No SIGUSR2 handler in any process (with the flag, the same check sees one in each), but the
    # signal is ignored: asking a worker without the flag for a dump must not kill it.
    for pid in pids:
        assert not catches(pid, signal.SIGUSR2), f"pid {pid} catches SIGUSR2 without the flag"
        assert signal_mask(pid, "SigIgn", signal.SIGUSR2), f"pid {pid} would die of SIGUSR2"
        os.kill(pid, signal.SIGUSR2)
    time.sleep(0.5)
    assert send(producer, {"args": {"id": 2}}, queue=queue).get(timeout=30)["status_code"] == 200
    assert worker.process.poll() is None
    assert set(worker_pids(worker, pool)) == set(pids), "no process died of SIGUSR2"




@pytest.mark.parametrize("pool", ["prefork", "gevent"])
@pytest.mark.parametrize("flag", ["0", "1"])
def test_worker_wiring_starts_tracing_only_with_the_flag(pool, flag):
    """The worker's own signal wiring, run in a fresh interpreter: the flag alone decides."""
    env = worker_env(CELERY_WORKER_POOL=pool, FORWARDER_MEMORY_DEBUG=flag)
    env.pop("PYTHONTRACEMALLOC", None)
    done = subprocess.run([sys.executable, str(CHILDREN / "memory_wiring.py")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    on = flag == "1"
    assert seen["tracemalloc_imported"] is on and seen["tracing"] is on and seen["memory_module"] is on, seen
    if pool == "prefork":
        assert ("forwarder-memory-debug" in seen["threads"]) is on, seen
        assert ("_on_signal_thread" in seen["usr2_handler"]) is on, seen
