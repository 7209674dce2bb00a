"""A model answer cannot OOM the worker: answers and results over their limits fail that task alone.

The example model streams its huge answers (``devtools.servers``: ``huge`` with a Content-Length,
``huge-chunked`` without one), so this test process never holds them. The worker's resident memory (summed
over its processes) is measured before, at its peak (the kernel's high-water mark, which no sampling
interval can miss) and after. It is also sampled all along, and the worker SIGKILLed should it grow far
past the bound, so a regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from devtools.servers import ModelServer, WorkerProcess, wait_for
from tests.support.faults import *  # noqa: F403  (helpers and fixtures)
from tests.support.faults import FINAL, POOLS, read_metas, send, statuses, wait_error_meta, wait_final

pytestmark = pytest.mark.faults

MIB = 1024 * 1024
#: The answer a runaway model sends, and the limit the worker is given.
HUGE = 200_000_000
LIMIT = 16 * MIB
#: Growth of the worker's RSS over its warmed-up level: at most this while the huge answers arrive (about
#: three times the limit: one answer read up to it, its buffer's slack, the allocator's; a quarter of the
#: 200 MB answer; measured: about 18 MB) ...
PEAK_BOUND_MB = 50
#: ... and at most this once every task is over.
AFTER_BOUND_MB = 20
#: Growth at which the sampler SIGKILLs the worker (the unbounded code reads 200 MB several times over).
KILL_AT_MB = 600


class RssSampler:
    """Samples ``worker.memory()["rss"]`` (MB, all its processes) every 20 ms from a thread."""

    def __init__(self, worker: WorkerProcess, baseline: float) -> None:
        self.worker = worker
        self.baseline = baseline
        self.peak = baseline
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            rss = self.worker.memory()["rss"]
            self.peak = max(self.peak, rss)
            if rss - self.baseline > KILL_AT_MB:
                self.killed = True
                self.worker.kill()
                return


def processes(worker: WorkerProcess) -> list[int]:
    return [worker.pid, *(child.pid for child in worker.children())]


def reset_peak_rss(worker: WorkerProcess) -> None:
    """Restart each worker process's RSS high-water mark (Linux: ``5`` into ``/proc/<pid>/clear_refs``)."""
    for pid in processes(worker):
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")


def peak_rss(worker: WorkerProcess) -> float:
    """The sum of the worker's processes' RSS high-water marks (``VmHWM``) in MB, as ``memory()`` counts MB:
    exact where sampling would miss a peak between samples (and for prefork, a bound on their sum)."""
    total = 0
    for pid in processes(worker):
        with open(f"/proc/{pid}/status") as handle:
            total += next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    return total * 1024 / 1e6


def settled_rss(worker: WorkerProcess) -> float:
    """The worker's RSS (MB) once it stops moving: the lowest of a few samples over half a second."""
    samples = []
    for _ in range(5):
        samples.append(worker.memory()["rss"])
        time.sleep(0.1)
    return min(samples)


def finished(results, ids: list[str]) -> bool:
    metas = read_metas(results, ids)
    return len(metas) == len(ids) and all(meta["status"] in FINAL for meta in metas.values())


@pytest.fixture
def big_model(model: ModelServer) -> Iterator[ModelServer]:
    """The shared model, answering request ids ``huge-length`` and ``huge-chunked`` with 200 MB."""
    model.behaviour.huge_bytes = HUGE
    model.behaviour.mode_by_id = {"huge-length": "huge", "huge-chunked": "huge-chunked"}
    yield model


def normal(producer, queue: str, ids: range) -> dict[str, int]:
    return {send(producer, queue, {"args": {"id": n}}): n for n in ids}


@pytest.mark.parametrize("pool", POOLS)
def test_a_200_mb_answer_fails_that_task_naming_the_limit_others_succeed_and_rss_stays_bounded(
    pool: str, start_worker: Callable[..., WorkerProcess], producer, big_model: ModelServer, queue: str,
    results,
):
    concurrency = 8 if pool == "gevent" else 4
    worker = start_worker(pool, CELERY_WORKER_CONCURRENCY=str(concurrency), FORWARDER_MAX_RESPONSE_BYTES=str(LIMIT))
    # Warm up: every slot has run tasks (imports done, connections open) before the baseline is read.
    warm = normal(producer, queue, range(2 * concurrency))
    assert set(statuses(wait_final(results, warm, 60, [worker])).values()) == {"SUCCESS"}
    baseline = settled_rss(worker)
    reset_peak_rss(worker)

    big_model.behaviour.delay = 0.5  # every task of the batch is in flight at once
    big_model.behaviour.peak_in_flight = 0
    with RssSampler(worker, baseline) as sampler:
        huge = [send(producer, queue, {"args": {"id": name}}) for name in ("huge-length", "huge-chunked")]
        others = normal(producer, queue, range(100, 100 + 2 * concurrency - 2))
        wait_for(lambda: sampler.killed or finished(results, [*huge, *others]), 90, "the batch's results")
    assert not sampler.killed, (
        f"{pool}: the worker's RSS grew past {KILL_AT_MB} MB over {baseline:.0f} MB (peak {sampler.peak:.0f} MB): "
        f"SIGKILLed\n{worker.output[-2000:]}")
    metas = wait_final(results, [*huge, *others], 10, [worker])
    failed = wait_error_meta(results, huge, 30, [worker])
    peak, after = max(peak_rss(worker), sampler.peak), settled_rss(worker)

    assert big_model.behaviour.peak_in_flight >= concurrency
    for task_id in huge:
        result = failed[task_id]["result"]
        assert failed[task_id]["status"] == "FAILURE" and result["exc_type"] == "ModelResponseTooLarge", result
        error = json.loads(result["custom"])["error"]
        assert f"more than {LIMIT} bytes" in error and "FORWARDER_MAX_RESPONSE_BYTES" in error, error
    for task_id, n in others.items():
        assert metas[task_id]["status"] == "SUCCESS", metas[task_id]
        assert json.loads(metas[task_id]["result"]["result"])["echo"] == {"id": n}
    assert big_model.behaviour.requests["huge-length"] == big_model.behaviour.requests["huge-chunked"] == 1  # no retry
    # Neither huge answer was read whole: the worker closed both connections (200 MB never crossed).
    wait_for(lambda: big_model.behaviour.huge_cut == 2, 10, "both huge answers cut off")
    assert big_model.behaviour.huge_sent == 0
    growth, left = peak - baseline, after - baseline
    print(f"\n{pool}: RSS baseline {baseline:.1f} MB, peak {peak:.1f} MB (+{growth:.1f}; sampled every 20 ms: "
          f"{sampler.peak:.1f}), after {after:.1f} MB (+{left:.1f})")
    assert growth < PEAK_BOUND_MB, f"RSS grew {growth:.1f} MB over {baseline:.1f} MB while answers arrived"
    assert left < AFTER_BOUND_MB, f"RSS still {left:.1f} MB over {baseline:.1f} MB once the tasks were over"
    # ... and the worker keeps serving.
    big_model.behaviour.delay = 0
    more = normal(producer, queue, range(200, 200 + concurrency))
    assert set(statuses(wait_final(results, more, 60, [worker])).values()) == {"SUCCESS"}
    assert "WorkerLostError" not in worker.output and "Traceback" not in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_a_result_over_the_result_limit_fails_that_task_naming_the_limit_before_the_store(
    pool: str, start_worker: Callable[..., WorkerProcess], producer, big_model: ModelServer, queue: str,
    results,
):
    # A 2 MB answer is well within the answer limit (default 64 MiB); its result is not within 1 MB.
    big_model.behaviour.huge_bytes = 2_000_000
    worker = start_worker(pool, FORWARDER_MAX_RESULT_BYTES="1000000")
    big = send(producer, queue, {"args": {"id": "huge-chunked"}})
    small = normal(producer, queue, range(3))
    assert wait_final(results, [big], 60, [worker])[big]["status"] == "FAILURE"
    failed = wait_error_meta(results, [big], 30, [worker])[big]
    assert failed["result"]["exc_type"] == "ResultTooLarge", failed
    stored = len(json.dumps({"result": json.dumps({"text": "a" * (2_000_000 - 12)}), "status_code": 200}))
    error = json.loads(failed["result"]["custom"])["error"]
    assert error == (f"the task's result is {stored} bytes as JSON, more than 1000000 bytes (the limit, set by "
                     "FORWARDER_MAX_RESULT_BYTES); it was not stored"), error
    assert set(statuses(wait_final(results, small, 60, [worker])).values()) == {"SUCCESS"}
    assert big_model.behaviour.huge_sent == 1  # read whole: the answer itself was within its limit
    assert "Traceback" not in worker.output
